"""Slots, the SlotPool that leases them, and its configuration."""

from atropos.errors import (
    AcquireTimeout,
    BackendError,
    InfrastructureError,
    InvalidToolCall,
    LeaseError,
    PoolClosed,
    PoolConfigError,
    SlotFailed,
    SlotLost,
    SlotPoolError,
)
from atropos.slots.config import SlotPoolConfig
from atropos.slots.leasing import Slot
from atropos.slots.pool import SlotPool

__all__ = [
    "AcquireTimeout",
    "BackendError",
    "InfrastructureError",
    "InvalidToolCall",
    "LeaseError",
    "PoolClosed",
    "PoolConfigError",
    "Slot",
    "SlotFailed",
    "SlotLost",
    "SlotPool",
    "SlotPoolConfig",
    "SlotPoolError",
]
