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
    atropos_driver = "process"
    atropos_slots = "8"
    atropos_version = "0.1.0"
  }
  group "sandbox-0" {
    count = 1
    network {
      port "http" {
        static = 19000
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
    scaling {
      enabled = false
      min = 0
      max = 1
    }
    task "server" {
      driver = "raw_exec"
      config {
        command = "/bin/sh"
        args = ["-c", "if [ \"$(id -u)\" = 0 ]; then command -v setpriv >/dev/null || { echo 'atropos-sandbox: the task runs as root and has no setpriv (util-linux) to become nobody' >&2; exit 1; }; chown nobody \"${NOMAD_SECRETS_DIR}/atropos-token\" && exec setpriv --reuid nobody --regid \"$(id -g nobody)\" --clear-groups -- atropos-sandbox server --host \"${NOMAD_IP_http}\" --port \"${NOMAD_PORT_http}\" --data-dir \"${NOMAD_ALLOC_DIR}/data\" --slots 8 --token-file \"${NOMAD_SECRETS_DIR}/atropos-token\" --isolation auto --network auto; fi; exec atropos-sandbox server --host \"${NOMAD_IP_http}\" --port \"${NOMAD_PORT_http}\" --data-dir \"${NOMAD_ALLOC_DIR}/data\" --slots 8 --token-file \"${NOMAD_SECRETS_DIR}/atropos-token\" --isolation auto --network auto"]
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
  group "sandbox-1" {
    count = 1
    network {
      port "http" {
        static = 19001
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
    scaling {
      enabled = false
      min = 0
      max = 1
    }
    task "server" {
      driver = "raw_exec"
      config {
        command = "/bin/sh"
        args = ["-c", "if [ \"$(id -u)\" = 0 ]; then command -v setpriv >/dev/null || { echo 'atropos-sandbox: the task runs as root and has no setpriv (util-linux) to become nobody' >&2; exit 1; }; chown nobody \"${NOMAD_SECRETS_DIR}/atropos-token\" && exec setpriv --reuid nobody --regid \"$(id -g nobody)\" --clear-groups -- atropos-sandbox server --host \"${NOMAD_IP_http}\" --port \"${NOMAD_PORT_http}\" --data-dir \"${NOMAD_ALLOC_DIR}/data\" --slots 8 --token-file \"${NOMAD_SECRETS_DIR}/atropos-token\" --isolation auto --network auto; fi; exec atropos-sandbox server --host \"${NOMAD_IP_http}\" --port \"${NOMAD_PORT_http}\" --data-dir \"${NOMAD_ALLOC_DIR}/data\" --slots 8 --token-file \"${NOMAD_SECRETS_DIR}/atropos-token\" --isolation auto --network auto"]
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
