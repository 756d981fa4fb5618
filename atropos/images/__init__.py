"""Container images for sandbox servers: runtime discovery, the SIF cache, builds, `apptainer exec`."""

from atropos.images.apptainer import (
    CONTAINER_DATA_DIR,
    apptainer_secret_env,
    build_apptainer_exec_argv,
    exec_shell_command,
    shell_quote_argv,
)
from atropos.images.build import build_image
from atropos.images.cache import (
    PULL_POLICIES,
    PullPolicy,
    cached_image_path,
    default_cache_dir,
    list_images,
    pull_image,
    pulled_images,
    remove_images,
    resolve_singularity_image,
)
from atropos.images.errors import (
    ApptainerNotFoundError,
    ImageBuildError,
    ImageError,
    ImageNotFoundError,
    ImagePullError,
)
from atropos.images.references import is_reference, normalize_reference, sif_name_for
from atropos.images.runtime import ApptainerRuntime, find_runtime

__all__ = [
    "CONTAINER_DATA_DIR",
    "PULL_POLICIES",
    "ApptainerNotFoundError",
    "ApptainerRuntime",
    "ImageBuildError",
    "ImageError",
    "ImageNotFoundError",
    "ImagePullError",
    "PullPolicy",
    "apptainer_secret_env",
    "build_apptainer_exec_argv",
    "build_image",
    "cached_image_path",
    "default_cache_dir",
    "exec_shell_command",
    "find_runtime",
    "is_reference",
    "list_images",
    "normalize_reference",
    "pull_image",
    "pulled_images",
    "remove_images",
    "resolve_singularity_image",
    "shell_quote_argv",
    "sif_name_for",
]
