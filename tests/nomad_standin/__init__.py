"""A stand-in for a Nomad agent (server + one client node) for tests on machines without Nomad.

It speaks the part of Nomad's HTTP API that `atropos.nomad.NomadClient` uses, on a real loopback
socket, and really runs `raw_exec` tasks as local processes with Nomad's environment. Docker tasks
cannot run here: like a Nomad client without a Docker engine, the node lacks the `docker` driver, so
docker groups are not placed (`missing drivers`); `docker="broken"` instead places them and fails
each start with a `Driver Failure` (an image pull error), for the diagnosis path.
"""

from tests.nomad_standin.api import Faults, NomadStandIn, Served

__all__ = ["Faults", "NomadStandIn", "Served"]
