"""When an image is pulled: the policy SIF pulls (atropos.images.cache) and the registry's task
images (atropos.images.roots) share; here, out of the images package, so settings can name it."""

from __future__ import annotations

from typing import Literal, get_args

PullPolicy = Literal["never", "always", "missing"]
PULL_POLICIES: tuple[str, ...] = get_args(PullPolicy)
