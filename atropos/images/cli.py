"""`atropos-sandbox image ...`: pull, build, list the SIF cache, show the runtime."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, cast

from atropos.images.build import build_image, default_build_output
from atropos.images.cache import PULL_POLICIES, PullPolicy, default_cache_dir, list_images, pull_image
from atropos.images.errors import ImageError
from atropos.images.runtime import find_runtime
from atropos.units import format_size

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    image = subparsers.add_parser(
        "image",
        help="SIF images: pull, build, list the cache, show the apptainer runtime",
        description="Manage Apptainer/Singularity images (SIF) for the singularity driver.",
    )
    image.set_defaults(handler=lambda _args: _usage(image))
    actions = image.add_subparsers(dest="image_command", metavar="ACTION")

    pull = actions.add_parser("pull", help="pull a reference into the SIF cache; prints the SIF path")
    pull.add_argument("ref", metavar="REF", help="docker://python:3.11, library://..., or python:3.11")
    pull.add_argument("--policy", choices=PULL_POLICIES, default="missing", help="default: missing")
    _add_common(pull, cache=True)
    pull.set_defaults(handler=_pull)

    build = actions.add_parser("build", help="build a SIF from a definition file; prints the SIF path")
    build.add_argument("def_file", metavar="DEF", help="Apptainer definition file")
    build.add_argument("-o", "--output", metavar="OUT", help="SIF to write (default: ./<DEF stem>.sif)")
    build.add_argument(
        "--build-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="value for a {{ KEY }} of the definition (repeatable), e.g. IMAGE=ghcr.io/org/atropos-sandbox:1",
    )
    build.add_argument("--fakeroot", action="store_true", help="build with --fakeroot (unprivileged builds)")
    _add_common(build, cache=False)
    build.set_defaults(handler=_build)

    listing = actions.add_parser("list", help="list the SIF cache with sizes")
    listing.add_argument("--cache-dir", metavar="D", help="cache directory (default: see `image pull`)")
    listing.set_defaults(handler=_list)

    runtime = actions.add_parser("runtime", help="show the apptainer/singularity binary and version")
    runtime.add_argument("--runtime", metavar="BIN", help="binary to probe (default: discovery)")
    runtime.set_defaults(handler=_runtime)

    seccomp = actions.add_parser(
        "seccomp-profile",
        help="print the Docker seccomp profile a sandbox container needs "
        "(for Nomad docker clients: /etc/atropos-sandbox/seccomp-sandbox.json)",
    )
    seccomp.set_defaults(handler=_seccomp_profile)


def _seccomp_profile(_args: argparse.Namespace) -> int:
    from atropos.images.docker_security import seccomp_profile_text

    sys.stdout.write(seccomp_profile_text())
    return 0


def _add_common(parser: argparse.ArgumentParser, *, cache: bool) -> None:
    if cache:
        parser.add_argument(
            "--cache-dir",
            metavar="D",
            help="SIF cache (default: $ATROPOS_SIF_CACHE, else $APPTAINER_CACHEDIR/sif, "
            "else ~/.cache/atropos-sandbox/sif)",
        )
    parser.add_argument(
        "--runtime",
        metavar="BIN",
        help="apptainer binary (default: $ATROPOS_APPTAINER, apptainer, singularity)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


Handler = Callable[[argparse.Namespace], int]


def _guarded(action: Handler) -> Handler:
    """Report `ImageError` as one clear line and exit status 1 instead of a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return action(args)
        except ImageError as exc:
            print(f"atropos-sandbox image: error: {exc}", file=sys.stderr)
            return 1

    return run


@_guarded
def _pull(args: argparse.Namespace) -> int:
    path = pull_image(
        args.ref,
        cast(PullPolicy, args.policy),
        args.cache_dir,
        args.runtime,
        None if args.quiet else _progress,
    )
    print(path)
    return 0


@_guarded
def _build(args: argparse.Namespace) -> int:
    out = args.output or default_build_output(args.def_file)
    flags = ["--fakeroot"] if args.fakeroot else []
    for pair in args.build_arg:
        if "=" not in pair:
            raise ImageError(f"--build-arg needs KEY=VALUE, not {pair!r}")
        flags += ["--build-arg", pair]
    path = build_image(args.def_file, out, args.runtime, None if args.quiet else _progress, build_args=flags)
    print(path)
    return 0


@_guarded
def _list(args: argparse.Namespace) -> int:
    root = args.cache_dir or default_cache_dir()
    images = list_images(root)
    print(f"# SIF cache: {root}")
    for path, size in images:
        print(f"{format_size(size):>10}  {path.name}")
    total = sum(size for _, size in images)
    print(f"# {len(images)} image(s), {format_size(total)}")
    return 0


@_guarded
def _runtime(args: argparse.Namespace) -> int:
    found = find_runtime(args.runtime)
    print(f"{found.binary}\t{found.flavor} {found.version}")
    return 0
