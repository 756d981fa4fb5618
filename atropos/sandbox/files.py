"""`read_file` and `write_file` tools, confined to the slot's workspace."""

from __future__ import annotations

import base64
import binascii
import os
import shutil
import time
from typing import Any

from atropos.sandbox.pathsafe import PathEscapeError, resolve_in_workspace


def _refused(started: float, error: str) -> dict[str, Any]:
    return {"ok": False, "error": error, "duration_ms": (time.monotonic() - started) * 1000.0}


def read_file(root: str, args: dict[str, Any], limit: int) -> dict[str, Any]:
    started = time.monotonic()
    path = str(args["path"])
    limit = min(limit, int(args.get("max_bytes") or limit))
    try:
        real = resolve_in_workspace(root, path)
        size = os.stat(real).st_size
        if size > limit:
            return _refused(started, f"{path}: file is {size} bytes, over the read limit of {limit} bytes")
        with open(real, "rb") as fh:
            data = fh.read(limit + 1)
    except PathEscapeError as exc:
        return _refused(started, str(exc))
    except IsADirectoryError:
        return _refused(started, f"{path}: is a directory")
    except FileNotFoundError:
        return _refused(started, f"{path}: no such file")
    except OSError as exc:
        return _refused(started, f"{path}: {exc.strerror or exc}")
    if len(data) > limit:
        return _refused(started, f"{path}: file grew past the read limit of {limit} bytes")
    if args.get("encoding") == "base64":
        content = base64.b64encode(data).decode("ascii")
    else:
        try:
            content = data.decode("utf-8")
        except UnicodeDecodeError:
            return _refused(started, f"{path}: not UTF-8 text; read it with encoding=base64")
    return {"ok": True, "output": content, "stdout": content,
            "duration_ms": (time.monotonic() - started) * 1000.0}


def write_file(root: str, args: dict[str, Any], limit: int) -> dict[str, Any]:
    started = time.monotonic()
    path = str(args["path"])
    content = str(args.get("content", ""))
    try:
        if args.get("encoding") == "base64":
            data = base64.b64decode(content, validate=True)
        else:
            data = content.encode("utf-8")
    except (binascii.Error, ValueError) as exc:
        return _refused(started, f"{path}: content is not valid base64 ({exc})")
    if len(data) > limit:
        return _refused(started, f"{path}: {len(data)} bytes is over the write limit of {limit} bytes")
    try:
        real = resolve_in_workspace(root, path)
        if os.path.isdir(real):
            return _refused(started, f"{path}: is a directory")
        os.makedirs(os.path.dirname(real), exist_ok=True)
        with open(real, "wb") as fh:
            fh.write(data)
        if args.get("mode") is not None:
            os.chmod(real, int(args["mode"]))
    except PathEscapeError as exc:
        return _refused(started, str(exc))
    except OSError as exc:
        return _refused(started, f"{path}: {exc.strerror or exc}")
    message = f"wrote {len(data)} bytes to {path}"
    return {"ok": True, "output": message, "stdout": message,
            "duration_ms": (time.monotonic() - started) * 1000.0}


def _make_writable(top: str) -> None:
    for dirpath, dirnames, _ in os.walk(top):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o700)


def empty_dir(root: str) -> None:
    """Remove everything under `root` (a bind mount point, so `root` itself stays)."""
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if os.path.isdir(path) and not os.path.islink(path):
            try:
                shutil.rmtree(path)
            except PermissionError:  # an agent's `chmod 000 dir`
                os.chmod(path, 0o700)
                _make_writable(path)
                shutil.rmtree(path)
        else:
            os.unlink(path)
