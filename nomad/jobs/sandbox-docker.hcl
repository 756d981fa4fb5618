job "atropos-sandbox" {
  name = "atropos-sandbox"
  type = "service"
  update {
    max_parallel = 1
    health_check = "task_states"
    min_healthy_time = "5s"
    healthy_deadline = "5m"
    progress_deadline = "10m"
    auto_revert = false
  }
  meta {
    atropos_kind = "sandbox"
    atropos_driver = "docker"
    atropos_slots = "8"
    atropos_version = "0.1.0"
  }
  group "sandbox" {
    count = 2
    network {
      port "http" {
        to = 8080
      }
    }
    restart {
      attempts = 2
      interval = "5m"
      delay = "5s"
      mode = "fail"
    }
    reschedule {
      attempts = 3
      interval = "1h"
      delay = "10s"
      delay_function = "exponential"
      max_delay = "2m"
      unlimited = false
    }
    task "server" {
      driver = "docker"
      config {
        cap_drop = ["all"]
        cap_add = ["sys_admin", "chown", "dac_override", "fowner", "setuid", "setgid"]
        security_opt = ["seccomp=/etc/atropos-sandbox/seccomp-sandbox.json", "apparmor=unconfined"]
        devices = [{ host_path = "/dev/net/tun", container_path = "/dev/net/tun" }]
        image = "atropos-sandbox:latest"
        ports = ["http"]
        entrypoint = ["atropos-sandbox"]
        args = ["server", "--host", "0.0.0.0", "--port", "8080", "--data-dir", "${NOMAD_ALLOC_DIR}/data", "--slots", "8", "--token-file", "/secrets/atropos-token", "--isolation", "auto", "--network", "auto"]
      }
      template {
        data = "{{ with nomadVar \"nomad/jobs/atropos-sandbox\" }}{{ .token }}{{ end }}"
        destination = "secrets/atropos-token"
        change_mode = "noop"
        perms = "0400"
      }
      resources {
        cpu = 1000
        memory = 2048
      }
      kill_signal = "SIGTERM"
      kill_timeout = "10s"
    }
  }
}
