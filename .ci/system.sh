#!/usr/bin/env bash
# Debian packages and daemons the tests need, installed and started from nothing (CI runs as root
# on a fresh machine). Idempotent: what is already there is left as it is.
#   - docker.io: a real Docker engine for the docker-driver tests, and debootstrap for a base image
#     made without any registry (the engine never pulls);
#   - passt (pasta) and nftables: network mode `public`, each slot in a network namespace of its own
#     behind its server's hub (one pasta, the hub's ruleset); /dev/net/tun opened to unprivileged
#     users as on most HPC nodes (pasta runs as the server's unprivileged user);
#   - bubblewrap: Debian's 0.8 on PATH, as on most machines with flatpak: the server must still pick
#     the bundled 0.11 (overlay forks, a bounded /tmp) and say so;
#   - iproute2: `ip` for the slots' routes and the tests' network namespaces;
#   - slurm-wlm and munge: a real one-node SLURM cluster (slurmctld + slurmd here, proctrack/linuxproc,
#     task/none) for the slurm backend's tests.
set -euo pipefail

BASE_IMAGE="${ATROPOS_CI_BASE_IMAGE:-atropos-ci-base:bookworm}"

log() { echo "ci/system: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
    log "not root: installing nothing (docker and network tests skip with their reasons)"
    exit 0
fi

need=()
for pkg in docker.io passt nftables debootstrap iproute2 util-linux uidmap slurm-wlm munge bubblewrap skopeo squashfs-tools; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
    log "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

[ -c /dev/net/tun ] && chmod 0666 /dev/net/tun

if ! docker info >/dev/null 2>&1; then
    log "starting dockerd"
    mkdir -p /var/log
    nohup dockerd >/var/log/atropos-ci-dockerd.log 2>&1 &
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && break
        sleep 1
    done
    docker info >/dev/null 2>&1 || { tail -20 /var/log/atropos-ci-dockerd.log >&2; log "dockerd did not start"; exit 1; }
fi

if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    log "making $BASE_IMAGE from a debootstrap rootfs (no registry)"
    rootfs="$(mktemp -d /var/tmp/atropos-ci-rootfs.XXXXXX)"
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" \
        http://deb.debian.org/debian >/dev/null
    tar -C "$rootfs" -c . | docker import - "$BASE_IMAGE" >/dev/null
fi
# munge (as its own user) and a one-node SLURM: this machine is controller and node, on loopback only
mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged
node="$(hostname)"
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
chown slurm:slurm /var/spool/slurmctld /var/log/slurm
if [ ! -f /etc/slurm/slurm.conf ]; then
    cat >/etc/slurm/slurm.conf <<CONF
ClusterName=atropos-ci
SlurmctldHost=$node(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
NodeName=$node NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=4096 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:8
CONF
fi
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 30); do
    sinfo -h -o %T 2>/dev/null | grep -q -E "idle|mixed|alloc" && break
    sleep 1
done
sinfo -h -o %T | grep -q -E "idle|mixed|alloc" || { tail -20 /var/log/slurm/slurmctld.log >&2; log "SLURM did not start"; exit 1; }

log "ready: $(docker version --format 'docker {{.Server.Version}}'), base image $BASE_IMAGE, $(pasta --version 2>/dev/null | head -1 || echo 'no pasta'), SLURM $(sinfo -V)"
