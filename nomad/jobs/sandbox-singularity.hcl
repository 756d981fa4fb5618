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
    atropos_driver = "singularity"
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
        args = ["-c", "exec apptainer exec --containall --bind \"${NOMAD_ALLOC_DIR}/data:/data\" --bind /dev/full /shared/images/atropos-sandbox.sif atropos-sandbox server --host \"${NOMAD_IP_http}\" --port \"${NOMAD_PORT_http}\" --data-dir /data --slots 8 --isolation auto --network allow"]
      }
      env {
        APPTAINERENV_ATROPOS_SANDBOX_TOKEN = "REPLACE-WITH-A-SECRET-TOKEN"
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
        args = ["-c", "exec apptainer exec --containall --bind \"${NOMAD_ALLOC_DIR}/data:/data\" --bind /dev/full /shared/images/atropos-sandbox.sif atropos-sandbox server --host \"${NOMAD_IP_http}\" --port \"${NOMAD_PORT_http}\" --data-dir /data --slots 8 --isolation auto --network allow"]
      }
      env {
        APPTAINERENV_ATROPOS_SANDBOX_TOKEN = "REPLACE-WITH-A-SECRET-TOKEN"
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
