"""The slot's end of a bridge (atropos.sandbox.server.bridges): a listening TCP socket on the slot's
own loopback, handed to the server, which relays what connects to it to a service the pool's user
named. The runner only makes the socket: the bytes never pass through it, so a slot with a bridge
still hibernates.

Standard library only: the runner runs without site-packages.
"""

from __future__ import annotations

import socket

_BACKLOG = 128


def listen_and_hand_over(port: int, channel: str) -> int:
    """Listen on 127.0.0.1:`port` of this network namespace and pass the socket over the Unix
    socket `channel` (SCM_RIGHTS); the port it listens on (the one asked, or a free one for 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(_BACKLOG)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as link:
            link.settimeout(5.0)  # never the runner stuck on a channel others of the slot crowd
            link.connect(channel)
            socket.send_fds(link, [b"L"], [listener.fileno()])
        bound: int = listener.getsockname()[1]
        return bound
