"""Nodes a pool's replacements stay away from.

A server lost with its node (nothing the pool had there answers, not even with a refusal) is replaced
elsewhere, by a job constraint `${node.unique.id} != <node>`. Left alone, Nomad would place the replacement back on
that node: it counts a node as ready until the node's heartbeat TTL runs out (10-30 s on a small
cluster), long after the pool has declared the loss.

The constraint goes when Nomad says the node is back: `ready` again after a status change since the
loss (Nomad marked it down, then it returned), gone from Nomad, or still `ready` with no change
`ALIVE_GRACE` seconds after the loss (its heartbeats never stopped: the servers failed, the node did
not). The pool checks before each placement it asks for, so a node that came back takes servers again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from atropos.nomad.errors import NomadNotFound
from atropos.nomad.models import Constraint
from atropos.nomad.responses import NodeInfo

if TYPE_CHECKING:
    from atropos.nomad.client import NomadClient

__all__ = ["ALIVE_GRACE", "NodeAvoidance"]

log = logging.getLogger("atropos.nomad")

ALIVE_GRACE = 60.0
"""Seconds a node Nomad never stopped calling ready stays avoided: well past Nomad's heartbeat TTL
plus grace, so a node that really died has been marked down by then."""

_NODE_ID = "${node.unique.id}"


@dataclass(frozen=True)
class _Avoided:
    name: str
    status_at: int  # Nomad's StatusUpdatedAt when the loss was seen
    since: float  # time.monotonic() of the loss


class NodeAvoidance:
    def __init__(self, grace: float = ALIVE_GRACE) -> None:
        self.grace = grace
        self._nodes: dict[str, _Avoided] = {}

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._nodes

    def __bool__(self) -> bool:
        return bool(self._nodes)

    def constraints(self) -> list[Constraint]:
        """One `!=` constraint per avoided node, in a stable order (an unchanged set re-registers
        an unchanged job)."""
        return [Constraint(l_target=_NODE_ID, operand="!=", r_target=node_id) for node_id in sorted(self._nodes)]

    def avoid(self, node_id: str, name: str, node: NodeInfo | None) -> None:
        """Keep replacements off `node_id` (`node`: what Nomad says of it now, None if it does not know it)."""
        self._nodes[node_id] = _Avoided(name or node_id[:8], node.status_updated_at if node else 0, time.monotonic())

    async def lift_recovered(self, client: NomadClient) -> list[str]:
        """Stop avoiding the nodes Nomad says are back; returns what each lift was, for the user."""
        lifted: list[str] = []
        for node_id, avoided in list(self._nodes.items()):
            try:
                node: NodeInfo | None = await client.read_node(node_id)
            except NomadNotFound:
                node = None
            why = self._back(avoided, node)
            if why is not None:
                del self._nodes[node_id]
                log.info("event=nomad_node_back node=%s reason=%s", avoided.name, why)
                lifted.append(f"node {avoided.name} {why}")
        return lifted

    def _back(self, avoided: _Avoided, node: NodeInfo | None) -> str | None:
        if node is None:
            return "is gone from Nomad"
        if node.status != "ready":
            return None
        if node.status_updated_at > avoided.status_at:
            return "is ready again"
        waited = time.monotonic() - avoided.since
        if waited >= self.grace:
            return f"stayed ready for {waited:.0f}s after the loss (its heartbeats never stopped)"
        return None
