#!/usr/bin/env bash
# Build the atropos-sandbox SIF for Apptainer/Singularity (run from anywhere in the repository).
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: scripts/build-sif.sh [--from registry|daemon|archive|airgapped] [options]

Build atropos-sandbox.sif with apptainer (or singularity).

Sources (--from):
  registry   (default) convert a pushed Docker image: needs --image REF (e.g. ghcr.io/org/atropos-sandbox:0.1.0)
  daemon     convert an image in the local Docker daemon (default --image atropos-sandbox:latest,
             from scripts/build-image.sh)
  archive    convert a `docker save` tar file given as --image FILE.tar
  airgapped  no Docker at all: Debian from a mirror (debootstrap) and the package from a local
             wheelhouse (built here first unless --wheelhouse DIR is given)

Options:
  --image REF         Docker reference (registry, daemon) or tar file (archive)
  -o, --output FILE   SIF to write (default: atropos-sandbox.sif in the current directory)
  --mirror URL        Debian mirror for airgapped (default: http://deb.debian.org/debian)
  --suite NAME        Debian suite for airgapped (default: bookworm; its Python must match the wheelhouse)
  --wheelhouse DIR    airgapped: use this wheelhouse instead of building dist/wheelhouse
  --wheelhouse-only   airgapped: build dist/wheelhouse and stop (run on a connected machine)
  --python-version V  airgapped: Python of the image for the wheelhouse (default: 3.11, bookworm's)
  --fakeroot          pass --fakeroot to apptainer build (unprivileged debootstrap builds)
  --notest            skip the image's %test (it starts a server in the image: root without every
                      capability, as in some containers and VMs, cannot; the built image is the same)
  -h, --help          this text

Environment: APPTAINER=/path/to/apptainer picks the binary (default: apptainer, else singularity);
PYTHON=python3 the interpreter that builds the wheelhouse. The SIF is written to a temporary file
beside FILE and renamed into place only when the build and the image's %test (unless --notest) pass.
USAGE
}

die() {
    echo "build-sif.sh: error: $*" >&2
    exit 1
}

source_kind=registry
image=""
output="atropos-sandbox.sif"
mirror="http://deb.debian.org/debian"
suite="bookworm"
wheelhouse=""
wheelhouse_only=false
python_version="3.11"
build_flags=()
notest=false
while [ "$#" -gt 0 ]; do
    case "$1" in
        --from | --image | -o | --output | --mirror | --suite | --wheelhouse | --python-version)
            [ "$#" -ge 2 ] || die "$1 needs a value"
            case "$1" in
                --from) source_kind="$2" ;;
                --image) image="$2" ;;
                -o | --output) output="$2" ;;
                --mirror) mirror="$2" ;;
                --suite) suite="$2" ;;
                --wheelhouse) wheelhouse="$2" ;;
                --python-version) python_version="$2" ;;
            esac
            shift 2
            ;;
        --wheelhouse-only)
            wheelhouse_only=true
            shift
            ;;
        --fakeroot)
            build_flags+=(--fakeroot)
            shift
            ;;
        --notest)
            build_flags+=(--notest)
            notest=true
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            usage >&2
            die "unknown argument: $1"
            ;;
    esac
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case "$output" in
    /*) ;;
    *) output="$PWD/$output" ;;
esac

find_runtime() {
    if [ -n "${APPTAINER:-}" ]; then
        command -v "$APPTAINER" >/dev/null 2>&1 || die "APPTAINER=$APPTAINER is not an executable"
        command -v "$APPTAINER"
        return
    fi
    command -v apptainer 2>/dev/null || command -v singularity 2>/dev/null ||
        die "neither apptainer nor singularity is on PATH: install Apptainer (https://apptainer.org/docs/admin/main/installation.html), load its module on a cluster, or set APPTAINER=/path/to/apptainer"
}

make_wheelhouse() {
    local python="${PYTHON:-python3}" dest="$repo/dist/wheelhouse"
    command -v "$python" >/dev/null 2>&1 || die "$python is needed to build the wheelhouse (set PYTHON=...)"
    "$python" -m pip --version >/dev/null 2>&1 || die "$python has no pip (install python3-pip)"
    rm -rf "$dest"
    mkdir -p "$dest"
    echo "build-sif.sh: building the atropos-sandbox wheel" >&2
    "$python" -m pip wheel --no-deps --wheel-dir "$dest" "$repo" >&2
    local wheel
    wheel="$(ls "$dest"/atropos_sandbox-*.whl)"
    # with the swerex extra: the image also serves SWE-ReX (atropos.integrations.swerex)
    echo "build-sif.sh: downloading dependencies for CPython $python_version (manylinux x86_64)" >&2
    "$python" -m pip download --dest "$dest" --only-binary=:all: \
        --implementation cp --python-version "$python_version" \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform linux_x86_64 \
        "${wheel}[swerex]" >&2
    wheelhouse="$dest"
}

if [ "$source_kind" = airgapped ] && [ -z "$wheelhouse" ]; then
    make_wheelhouse
    if "$wheelhouse_only"; then
        echo "$wheelhouse"
        exit 0
    fi
fi
if "$wheelhouse_only"; then
    die "--wheelhouse-only goes with --from airgapped and no --wheelhouse"
fi

runtime="$(find_runtime)"
build_args=()
case "$source_kind" in
    registry)
        [ -n "$image" ] || die "--from registry needs --image REF (or use --from daemon / --from airgapped)"
        definition="$repo/images/atropos-sandbox.def"
        build_args=(--build-arg BOOTSTRAP=docker --build-arg "IMAGE=$image")
        ;;
    daemon)
        command -v docker >/dev/null 2>&1 ||
            die "--from daemon needs docker on PATH (build the image with scripts/build-image.sh first)"
        image="${image:-atropos-sandbox:latest}"
        docker image inspect "$image" >/dev/null 2>&1 ||
            die "the Docker daemon has no image $image (run scripts/build-image.sh, or check access to the daemon)"
        definition="$repo/images/atropos-sandbox.def"
        build_args=(--build-arg BOOTSTRAP=docker-daemon --build-arg "IMAGE=$image")
        ;;
    archive)
        [ -f "$image" ] || die "--from archive needs --image FILE.tar (from docker save); got '${image}'"
        definition="$repo/images/atropos-sandbox.def"
        build_args=(--build-arg BOOTSTRAP=docker-archive --build-arg "IMAGE=$(cd "$(dirname "$image")" && pwd)/$(basename "$image")")
        ;;
    airgapped)
        command -v debootstrap >/dev/null 2>&1 ||
            die "--from airgapped needs debootstrap on the build host (apt-get install debootstrap / dnf install debootstrap)"
        [ -d "$wheelhouse" ] || die "wheelhouse $wheelhouse is not a directory"
        ls "$wheelhouse"/atropos_sandbox-*.whl >/dev/null 2>&1 || die "no atropos_sandbox wheel in $wheelhouse"
        wheelhouse="$(cd "$wheelhouse" && pwd)"
        definition="$repo/images/atropos-sandbox-airgapped.def"
        build_args=(--build-arg "MIRROR=$mirror" --build-arg "SUITE=$suite" --build-arg "WHEELHOUSE=$wheelhouse")
        ;;
    *)
        die "--from must be registry, daemon, archive or airgapped, not '$source_kind'"
        ;;
esac

mkdir -p "$(dirname "$output")"
partial="$(dirname "$output")/.$(basename "$output").$$.partial.sif"
trap 'rm -f "$partial"' EXIT
echo "build-sif.sh: $("$runtime" --version) building $output from $(basename "$definition")" >&2
started=$(date +%s)
# (the ${a[@]+...} form keeps empty arrays legal under `set -u` in bash < 4.4)
status=0
"$runtime" build ${build_flags[@]+"${build_flags[@]}"} "${build_args[@]}" "$partial" "$definition" >&2 || status=$?
if [ "$status" != 0 ]; then
    hint=""
    if ! "$notest"; then
        hint=" If it failed in the image's %test (above: it starts a server in the image, which root without every
capability cannot do in some containers and VMs), build as a normal user with --fakeroot, or pass --notest to
skip the test (the image is the same)."
    fi
    die "$(basename "$runtime") build failed (exit $status); $output was not written.$hint"
fi
mv -f "$partial" "$output"
echo "build-sif.sh: built $output ($(du -h "$output" | cut -f1), $(($(date +%s) - started)) s)" >&2
echo "$output"
