"""The lease book: which physical slot is free, leased (to whom), resetting or lost.

Pure bookkeeping, no I/O, so that acquire costs microseconds. FIFO-fair: a freed slot goes to
the longest waiter first. A slot is handed out only from the FREE state, and every hand-out
gets a new lease id, so a stale handle can never act on a slot leased to someone else.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from atropos.errors import LeaseError, SlotLost


class SlotStatus(enum.Enum):
    FREE = "free"
    LEASED = "leased"
    RESETTING = "resetting"
    DRAINING = "draining"  # being removed (scale-down, retirement): never handed out again
    LOST = "lost"


@dataclass(frozen=True)
class Slot:
    """A lease handle: what a trajectory holds while it uses one slot."""

    server_id: str
    index: int
    lease_id: int
    trajectory_id: str

    @property
    def slot_id(self) -> str:
        return f"{self.server_id}/{self.index}"


@dataclass(eq=False)
class SlotState:
    server_id: str
    index: int
    status: SlotStatus = SlotStatus.FREE
    lease_id: int = 0
    trajectory_id: str = ""
    dirty: bool = False  # ran something since it was last reset
    inflight: int = 0
    last_seen: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> tuple[str, int]:
        return (self.server_id, self.index)


class LeaseBook:
    def __init__(self) -> None:
        self.slots: dict[tuple[str, int], SlotState] = {}
        self._free: deque[SlotState] = deque()
        self._waiters: deque[asyncio.Future[SlotState]] = deque()
        self._lease_ids = itertools.count(1)
        # retiring servers, with how many of their slots are still in the book (they leave as they
        # come back), and who hears when the last one of a server has left
        self.retiring: dict[str, int] = {}
        self.on_emptied: Callable[[str], None] = lambda _server_id: None

    # -- membership ----------------------------------------------------------------------------

    def add(self, states: list[SlotState]) -> None:
        for st in states:
            self.slots[st.key] = st
            self.make_free(st)

    def remove_server(self, server_id: str, status: SlotStatus) -> list[SlotState]:
        """Take every slot of a server out of circulation (lost, or draining for scale-down)."""
        gone = [st for st in self.slots.values() if st.server_id == server_id]
        self.retiring.pop(server_id, None)
        for st in gone:
            st.status = status
            del self.slots[st.key]
        return gone

    def retire_server(self, server_id: str) -> int:
        """No slot of this server is handed out again: the free ones leave now, the others once
        they come back (then `on_emptied`). How many are still out."""
        slots = [st for st in self.slots.values() if st.server_id == server_id]
        self.retiring[server_id] = len(slots)
        for st in slots:
            if st.status is SlotStatus.FREE:
                self._leave(st)
        return self.retiring.get(server_id, 0)

    def _leave(self, st: SlotState, status: SlotStatus = SlotStatus.DRAINING) -> None:
        st.status = status
        del self.slots[st.key]
        self.retiring[st.server_id] -= 1
        if not self.retiring[st.server_id]:
            del self.retiring[st.server_id]
            self.on_emptied(st.server_id)

    def retire(self, st: SlotState) -> None:
        """Take one slot out of circulation for good (it could not be cleaned)."""
        if st.key in self.slots and st.server_id in self.retiring:
            self._leave(st, SlotStatus.LOST)  # counted out of its retiring server too
            return
        st.status = SlotStatus.LOST
        self.slots.pop(st.key, None)

    # -- free list and waiters ----------------------------------------------------------------

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def free_count(self) -> int:
        return sum(1 for st in self._free if st.status is SlotStatus.FREE)

    def make_free(self, st: SlotState) -> None:
        if st.key not in self.slots or st.status in (SlotStatus.LOST, SlotStatus.DRAINING):
            return
        if st.server_id in self.retiring:
            self._leave(st)
            return
        st.status = SlotStatus.FREE
        st.dirty = False
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                st.status = SlotStatus.LEASED  # reserved for this waiter; lease() fills it in
                waiter.set_result(st)
                return
        self._free.append(st)

    def take_free(self, prefer: Callable[[SlotState], bool] | None = None) -> SlotState | None:
        """A free slot for a caller when nobody waits before it (fast path), else None; one `prefer`
        likes (a server holding the caller's image) if there is one."""
        if self._waiters:
            return None  # someone waits already: FIFO, they go first
        if prefer is not None:
            for st in self._free:
                if st.status is SlotStatus.FREE and st.key in self.slots and prefer(st):
                    self._free.remove(st)
                    st.status = SlotStatus.LEASED
                    return st
        while self._free:
            st = self._free.popleft()
            if st.status is SlotStatus.FREE and st.key in self.slots:
                st.status = SlotStatus.LEASED
                return st
        return None

    def enqueue_waiter(self) -> asyncio.Future[SlotState]:
        fut: asyncio.Future[SlotState] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        return fut

    def drop_waiter(self, fut: asyncio.Future[SlotState]) -> None:
        """Forget a waiter that gave up; if a slot reached it meanwhile, pass the slot on."""
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            self.make_free(fut.result())
        else:
            fut.cancel()
        try:
            self._waiters.remove(fut)
        except ValueError:
            pass

    def fail_waiters(self, exc: BaseException) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(exc)

    # -- leases --------------------------------------------------------------------------------

    def lease(self, st: SlotState, trajectory_id: str) -> Slot:
        st.status = SlotStatus.LEASED
        st.lease_id = next(self._lease_ids)
        st.trajectory_id = trajectory_id
        st.last_seen = time.monotonic()
        return Slot(st.server_id, st.index, st.lease_id, trajectory_id)

    def check(self, slot: Slot) -> SlotState:
        """The slot's state if `slot` is the current lease on it; a clear error otherwise."""
        st = self.slots.get((slot.server_id, slot.index))
        if st is None or st.lease_id != slot.lease_id or st.status is SlotStatus.LOST:
            if st is None or st.status is SlotStatus.LOST:
                raise SlotLost(
                    f"slot {slot.slot_id} left the pool (its server was lost or removed); acquire another slot"
                )
            raise LeaseError(
                f"slot {slot.slot_id} is not leased to trajectory {slot.trajectory_id!r} "
                "any more (released, or reclaimed after its lease TTL)"
            )
        if st.status is not SlotStatus.LEASED:
            raise LeaseError(f"slot {slot.slot_id} is {st.status.value}, not leased")
        return st

    def end_lease(self, st: SlotState) -> None:
        st.lease_id = 0
        st.trajectory_id = ""

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in SlotStatus}
        for st in self.slots.values():
            out[st.status.value] += 1
        return out
