#!/usr/bin/env bash
# Build the atropos-sandbox Docker image from images/Dockerfile (run from anywhere in the repository).
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: scripts/build-image.sh [-t TAG] [--push] [-- DOCKER-BUILD-ARGS...]

Build the sandbox server image from images/Dockerfile with the repository as build context.

  -t, --tag TAG   image tag (default: atropos-sandbox:latest, or $ATROPOS_IMAGE_TAG)
  --push          docker push TAG after a successful build
  -h, --help      this text
  -- ARGS         passed to `docker build` as they are (e.g. --build-arg PYTHON_IMAGE=python:3.12-slim)

Next: scripts/build-sif.sh --from daemon   (turn the image into a SIF for Apptainer)
USAGE
}

die() {
    echo "build-image.sh: error: $*" >&2
    exit 1
}

tag="${ATROPOS_IMAGE_TAG:-atropos-sandbox:latest}"
push=false
extra=()
while [ "$#" -gt 0 ]; do
    case "$1" in
        -t | --tag)
            [ "$#" -ge 2 ] || die "$1 needs a value"
            tag="$2"
            shift 2
            ;;
        --push)
            push=true
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        --)
            shift
            extra=("$@")
            break
            ;;
        *)
            usage >&2
            die "unknown argument: $1"
            ;;
    esac
done

command -v docker >/dev/null 2>&1 ||
    die "docker is not installed or not on PATH (https://docs.docker.com/engine/install/); on a cluster without Docker, build a SIF directly: scripts/build-sif.sh --from airgapped"
docker info >/dev/null 2>&1 ||
    die "cannot reach the Docker daemon: is it running, and may $(id -un) use it (docker group or rootless Docker)?"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
echo "build-image.sh: building $tag from images/Dockerfile" >&2
docker build -f images/Dockerfile -t "$tag" ${extra[@]+"${extra[@]}"} . >&2
if "$push"; then
    docker push "$tag" >&2
fi
echo "$tag"
