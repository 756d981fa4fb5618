"""Resolve tool paths inside a slot's workspace, refusing anything that would leave it."""

from __future__ import annotations

import os

# Agents are told their workspace is /workspace; the same path works with and without bubblewrap.
WORKSPACE_ALIAS = "/workspace"


class PathEscapeError(ValueError):
    pass


def resolve_in_workspace(root: str, path: str) -> str:
    """Absolute, symlink-resolved path of `path` inside `root`, or PathEscapeError.

    `path` is relative to the workspace or absolute under /workspace. Symlinks are followed
    (also dangling ones, as far as they resolve) so a link that points out is refused too.
    """
    if "\x00" in path:
        raise PathEscapeError("path contains a NUL byte")
    real_root = os.path.realpath(root)
    if os.path.isabs(path):
        norm = os.path.normpath(path)
        if norm == WORKSPACE_ALIAS or norm.startswith(WORKSPACE_ALIAS + "/"):
            path = os.path.relpath(norm, WORKSPACE_ALIAS)
        elif norm == real_root or norm.startswith(real_root + "/"):
            path = os.path.relpath(norm, real_root)
        else:
            raise PathEscapeError(f"path {path!r} is outside the workspace ({WORKSPACE_ALIAS})")
    resolved = os.path.realpath(os.path.join(real_root, path))
    if resolved != real_root and not resolved.startswith(real_root + os.sep):
        raise PathEscapeError(f"path {path!r} resolves outside the workspace ({WORKSPACE_ALIAS})")
    return resolved
