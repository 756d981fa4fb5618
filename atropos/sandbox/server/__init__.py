"""The sandbox server: the aiohttp API, one runner per slot, and the isolation around the slots
(bubblewrap, per-slot networks, cgroups, giving up root). `register` adds `atropos-sandbox server`."""

from atropos.sandbox.server.main import StartupError, main, register

__all__ = ["StartupError", "main", "register"]
