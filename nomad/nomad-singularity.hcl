# Nomad agent configuration for atropos-sandbox jobs with driver `singularity` (Apptainer) or
# `process`: both run under Nomad's `raw_exec` driver, so nodes need neither Docker nor root-only
# CNI networking.
#
# One machine, for trying things out (a server and a client in one process, state in a temp dir):
#
#     nomad agent -dev -config=nomad/nomad-singularity.hcl
#
# A cluster: add the `plugin "raw_exec"` block (and the `client` settings you want) to each client's
# configuration; servers need nothing special.
#
# What the sandbox job relies on:
# - raw_exec runs the task as the agent's user with the agent's environment, so `apptainer` (or
#   `singularity`) and, for driver `process`, `atropos-sandbox` must be on the agent's PATH;
# - a task that starts as root (an agent run as root, as Nomad clients are) becomes the job's
#   task_user (default `nobody`, setpriv from util-linux) before apptainer or the server runs, so
#   nothing of a slot runs as root on the node; that user must be able to read the SIF and run
#   apptainer (and, for `process`, atropos-sandbox's Python) from where they are installed;
# - Apptainer shares the host network: each server binds a static host port (job base_port + index,
#   19000 by default), which must be free on the node and reachable from the machine running the pool;
# - the token the servers require is in no part of the job: the pool writes it to the Nomad Variable
#   nomad/jobs/<job> (its Nomad token needs variable write access there), and a template renders it
#   into the task's secrets dir (mode 0400), read with --token-file.

client {
  enabled = true

  # Keep Nomad's dynamic ports (20000-32000 by default) clear of the sandbox's static ports.
  min_dynamic_port = 20000
  max_dynamic_port = 32000
}

plugin "raw_exec" {
  config {
    # raw_exec is disabled by default because tasks run unisolated as the agent's user. The sandbox
    # server isolates each slot itself (bubblewrap) and demands a bearer token on every request.
    enabled = true
  }
}
