# Nomad agent configuration for atropos-sandbox jobs with driver `docker`.
#
# One machine (needs a running Docker engine):
#
#     nomad agent -dev -config=nomad/nomad-docker.hcl
#
# A cluster: add the `plugin "docker"` block to each client's configuration.
#
# What the sandbox job relies on:
# - each container's server listens on its container port (8080 by default); Nomad maps it to a
#   dynamic host port (the job's `DynamicPorts` entry `http` with `To`), so any number of containers
#   share a node;
# - the allocation directory is mounted at /alloc and the server keeps its slots in /alloc/data;
# - the token the servers require travels in the task environment, never on a command line.

client {
  enabled = true
}

plugin "docker" {
  config {
    # Remove stopped containers and, a while after their last use, their images.
    gc {
      container   = true
      image       = true
      image_delay = "10m"
    }

    # The sandbox server isolates each slot with bubblewrap, which needs to create namespaces inside
    # the container. Where Docker's default seccomp profile forbids that, the server falls back to
    # plain processes (isolation "auto") or refuses to start (isolation "bwrap"). To allow it, let
    # jobs add the SYS_ADMIN capability (job option docker_config = {cap_add = ["sys_admin"],
    # security_opt = ["seccomp=unconfined"]}) by listing it here:
    # allow_caps = ["audit_write", "chown", "dac_override", "fowner", "fsetid", "kill", "mknod",
    #               "net_bind_service", "setfcap", "setgid", "setpcap", "setuid", "sys_chroot",
    #               "sys_admin"]

    # Sandboxes never need host volumes or privileged containers.
    volumes {
      enabled = false
    }
    allow_privileged = false
  }
}
