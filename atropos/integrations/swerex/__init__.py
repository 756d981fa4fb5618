"""SWE-ReX on Apptainer: `ApptainerDeploymentConfig(image=...).get_deployment()` runs SWE-ReX's server
in an Apptainer (or Singularity) image, for HPC nodes without Docker or root (see deployment.py)."""

from atropos.integrations.swerex.deployment import ApptainerDeployment, ApptainerDeploymentConfig
from atropos.integrations.swerex.errors import ApptainerDeploymentError, PortInUseError, StartupTimeoutError

__all__ = [
    "ApptainerDeployment",
    "ApptainerDeploymentConfig",
    "ApptainerDeploymentError",
    "PortInUseError",
    "StartupTimeoutError",
]
