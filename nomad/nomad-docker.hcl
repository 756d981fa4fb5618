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
# - the token the servers require is in no part of the job: the pool writes it to the Nomad Variable
#   nomad/jobs/<job> before submitting, and a template renders it into the task's secrets dir.

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

    # The sandbox server isolates each slot with bubblewrap. Inside a container that needs (see
    # atropos/images/docker_security.py for what each one opens and why it is still safe):
    # - the sys_admin capability, once at start-up: Docker masks parts of /proc and the kernel then
    #   refuses slots a fresh /proc; the server mounts an unmasked /proc in a mount namespace of its
    #   own and gives root up (and every capability with it) before any slot starts. The job asks for
    #   cap_drop = ["all"] and adds back only sys_admin, chown, dac_override, fowner, setuid, setgid;
    #   Nomad lets a job add only what allow_caps lists, so sys_admin must be listed here;
    # - a seccomp profile allowing pivot_root and the namespace calls of bubblewrap and pasta
    #   (Docker's default forbids them). Nomad reads it from the client's disk: install it on every
    #   client with
    #       mkdir -p /etc/atropos-sandbox && atropos-sandbox image seccomp-profile > /etc/atropos-sandbox/seccomp-sandbox.json
    #   (the job's docker_seccomp_profile names another path);
    # - apparmor=unconfined (Docker's default AppArmor profile forbids mount(); no-op without AppArmor);
    # - the device /dev/net/tun for network mode `public` (per-slot network namespaces behind pasta).
    # Without them the server runs its slots without isolation and the pool refuses it, naming this file.
    allow_caps = ["audit_write", "chown", "dac_override", "fowner", "fsetid", "kill", "mknod",
                  "net_bind_service", "setfcap", "setgid", "setpcap", "setuid", "sys_chroot",
                  "sys_admin"]

    # Sandboxes never need host volumes or privileged containers.
    volumes {
      enabled = false
    }
    allow_privileged = false
  }
}
