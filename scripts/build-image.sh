#!/usr/bin/env bash
# Build the atropos-sandbox Docker image from images/Dockerfile (run from anywhere in the repository).
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: scripts/build-image.sh [-t TAG] [--ca-bundle FILE] [--push] [-- DOCKER-BUILD-ARGS...]

Build the sandbox server image from images/Dockerfile. The build context is a temporary copy of
the repository's files (tracked and untracked, without what .gitignore ignores), so a local .venv
never reaches the daemon, and the compiled slot runner, built here by cargo (the image has none; a
static binary runs in any image); without cargo on PATH the image's servers run the Python runner.

  -t, --tag TAG       image tag (default: atropos-sandbox:latest, or $ATROPOS_IMAGE_TAG)
  --ca-bundle FILE    CA certificates the build's pip must trust (a TLS-intercepting proxy); default:
                      $PIP_CERT, else $SSL_CERT_FILE, when set. Used by the build stage only.
  --no-ca-bundle      do not pass one even if those variables are set
  --push              docker push TAG after a successful build
  -h, --help          this text
  -- ARGS         passed to `docker build` as they are (e.g. --build-arg PYTHON_IMAGE=python:3.12-slim)

Next: scripts/build-sif.sh --from daemon   (turn the image into a SIF for Apptainer)
USAGE
}

die() {
    echo "build-image.sh: error: $*" >&2
    exit 1
}

tag="${ATROPOS_IMAGE_TAG:-atropos-sandbox:latest}"
ca_bundle="${PIP_CERT:-${SSL_CERT_FILE:-}}"
push=false
extra=()
while [ "$#" -gt 0 ]; do
    case "$1" in
        -t | --tag)
            [ "$#" -ge 2 ] || die "$1 needs a value"
            tag="$2"
            shift 2
            ;;
        --ca-bundle)
            [ "$#" -ge 2 ] || die "$1 needs a value"
            ca_bundle="$2"
            shift 2
            ;;
        --no-ca-bundle)
            ca_bundle=""
            shift
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
context="$(mktemp -d "${TMPDIR:-/tmp}/atropos-image-context.XXXXXX")"
trap 'rm -rf "$context"' EXIT
if git rev-parse --git-dir >/dev/null 2>&1; then
    git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
        [ -e "$f" ] && printf '%s\0' "$f"
    done | xargs -0 cp --parents -t "$context"
else
    tar -C "$repo" --exclude=.venv --exclude=.git -c . | tar -C "$context" -x
fi
mkdir "$context/.runner-bin"  # what the Dockerfile copies next to the server's script: empty without cargo
if command -v cargo >/dev/null 2>&1; then
    (cd runner && cargo build --release --locked --quiet) >&2
    cp runner/target/release/atropos-runner "$context/.runner-bin/"
else
    echo "build-image.sh: no cargo on PATH: the image's slots will run the Python runner" >&2
fi
build_args=()
if [ -n "$ca_bundle" ]; then
    [ -r "$ca_bundle" ] || die "--ca-bundle $ca_bundle: cannot read it"
    cp "$ca_bundle" "$context/.build-ca-bundle.crt"
    build_args=(--build-arg CA_BUNDLE=.build-ca-bundle.crt)
fi
echo "build-image.sh: building $tag from images/Dockerfile${ca_bundle:+ (CA bundle $ca_bundle for the build stage)}" >&2
docker build -f "$context/images/Dockerfile" -t "$tag" ${build_args[@]+"${build_args[@]}"} \
    ${extra[@]+"${extra[@]}"} "$context" >&2
if "$push"; then
    docker push "$tag" >&2
fi
echo "$tag"
