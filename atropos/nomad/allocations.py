"""Where a running allocation's server listens: host and port of its `http` label."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from atropos.nomad.builder import PORT_LABEL, group_index
from atropos.nomad.errors import NomadError
from atropos.nomad.responses import Allocation, AllocationEndpoint, NetworkStatus

__all__ = ["allocation_address", "allocation_endpoint", "by_index"]


def allocation_address(alloc: Allocation, label: str = PORT_LABEL) -> tuple[str, int]:
    """(host, port) of `label`, from `AllocatedResources.Shared.Ports` (HostIP + Value), else the
    group networks' `DynamicPorts`/`ReservedPorts` (`Shared.Networks`), else task networks, else the
    legacy `Resources.Networks` (old allocations). Works for docker and raw_exec allocations alike:
    `Value` is always the host port (`To` is the port inside a container)."""
    resources = alloc.allocated_resources
    if resources is not None and resources.shared is not None:
        for port in resources.shared.ports:
            if port.label == label and port.value and port.host_ip:
                return port.host_ip, port.value
    networks: list[NetworkStatus] = []
    if resources is not None:
        if resources.shared is not None:
            networks += resources.shared.networks
        for task in resources.tasks.values():
            networks += task.networks
    if alloc.resources is not None:
        networks += alloc.resources.networks
    found = _from_networks(networks, label)
    if found is None:
        raise NomadError(
            f"GET /v1/allocation/{alloc.id}",
            f"allocation {alloc.name or alloc.id} has no port labelled {label!r} with a host address",
        )
    return found


def _from_networks(networks: Iterable[NetworkStatus], label: str) -> tuple[str, int] | None:
    for network in networks:
        for port in [*network.reserved_ports, *network.dynamic_ports]:
            if port.label == label and port.value and network.ip:
                return network.ip, port.value
    return None


def allocation_endpoint(alloc: Allocation, label: str = PORT_LABEL) -> AllocationEndpoint:
    host, port = allocation_address(alloc, label)
    index = group_index(alloc.task_group)
    return AllocationEndpoint(
        alloc_id=alloc.id,
        job_id=alloc.job_id,
        group=alloc.task_group,
        index=index if index is not None else alloc.alloc_index,
        node_id=alloc.node_id,
        node_name=alloc.node_name,
        host=host,
        port=port,
    )


def by_index(endpoints: Sequence[AllocationEndpoint]) -> list[AllocationEndpoint]:
    """Endpoints in container order (index, then group and allocation id)."""
    return sorted(endpoints, key=lambda e: (e.index if e.index is not None else -1, e.group, e.alloc_id))
