"""Slots, the SlotPool that leases them, its configuration and its errors: what a pool's user imports."""

from atropos.errors import (
    AcquireTimeout,
    BackendError,
    InfrastructureError,
    InvalidToolCall,
    LeaseError,
    PoolClosed,
    PoolConfigError,
    SlotDraining,
    SlotFailed,
    SlotLost,
    SlotPoolError,
)
from atropos.sandbox.models import ExecuteResult
from atropos.slots.config import SlotPoolConfig
from atropos.slots.leasing import Slot
from atropos.slots.pool import BatchCall, SlotPool
from atropos.slots.sandbox import Sandbox
from atropos.slots.stats import PoolStats, percentile
from atropos.slots.sync import SyncSandbox, SyncSlotPool

__all__ = [
    "AcquireTimeout",
    "BackendError",
    "BatchCall",
    "ExecuteResult",
    "InfrastructureError",
    "InvalidToolCall",
    "LeaseError",
    "PoolClosed",
    "PoolConfigError",
    "PoolStats",
    "Sandbox",
    "Slot",
    "SlotDraining",
    "SlotFailed",
    "SlotLost",
    "SlotPool",
    "SlotPoolConfig",
    "SlotPoolError",
    "SyncSandbox",
    "SyncSlotPool",
    "percentile",
]
