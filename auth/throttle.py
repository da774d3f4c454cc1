"""Slowing down key guessing: failed authentications counted per peer address.

:class:`FailureThrottle` keeps, per peer host, the times of its latest ``max_failures``
failed authentications; once that many fall within ``window_s`` the peer is refused (429
with Retry-After) until the oldest of them leaves the window. Peers are keyed by host
only (a client opening new connections gets a new port each time), taken from gRPC peer
strings (``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``, percent-encoded or not) or plain
addresses. Memory is bounded: beyond ``max_peers`` hosts the least recently failing one
is forgotten. One lock; every operation is O(1) apart from a window's trim.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from urllib.parse import unquote

__all__ = ["FailureThrottle", "peer_host"]

_UNKNOWN = "unknown"


def peer_host(peer: str | None) -> str:
    """The host part of a peer address: ``ipv4:10.0.0.1:443`` -> ``10.0.0.1``, ``[::1]:80``
    -> ``::1``; an address without a port is returned as is, None as ``unknown``."""
    if not peer:
        return _UNKNOWN
    if "%" in peer:
        peer = unquote(peer)
    for scheme in ("ipv4:", "ipv6:"):
        if peer.startswith(scheme):
            peer = peer[len(scheme) :]
            break
    if peer.startswith("["):
        end = peer.find("]")
        return peer[1:end] if end > 0 else peer
    if peer.count(":") == 1:  # host:port (a bare IPv6 address has several colons)
        return peer.partition(":")[0]
    return peer


class FailureThrottle:
    """At most ``max_failures`` failed authentications per peer host within ``window_s``.

    ``max_failures`` 0 turns the throttle off. ``clock``: seconds, monotonic (tests inject
    one).
    """

    def __init__(
        self,
        max_failures: int,
        window_s: float,
        *,
        max_peers: int = 10000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_failures < 0 or not window_s > 0 or max_peers < 1:
            raise ValueError(
                "max_failures must be 0 (off) or more, window_s and max_peers positive"
            )
        self._max = int(max_failures)
        self._window = float(window_s)
        self._max_peers = int(max_peers)
        self._clock = clock
        self._peers: collections.OrderedDict[str, collections.deque[float]] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()

    def retry_after(self, peer: str | None) -> float | None:
        """None when ``peer`` may try; else seconds until its window has room again."""
        if self._max == 0 or not self._peers:  # no recent failures: the per-call case
            return None
        host = peer_host(peer)
        with self._lock:
            times = self._peers.get(host)
            if times is None:
                return None
            now = self._clock()
            horizon = now - self._window
            while times and times[0] <= horizon:
                times.popleft()
            if not times:
                del self._peers[host]
                return None
            if len(times) < self._max:
                return None
            return max(times[0] + self._window - now, 0.001)

    def failed(self, peer: str | None) -> None:
        """Count a failed authentication of ``peer`` now."""
        if self._max == 0:
            return
        host = peer_host(peer)
        now = self._clock()
        with self._lock:
            times = self._peers.get(host)
            if times is None:
                # Only the latest max_failures times matter to the decision.
                times = self._peers[host] = collections.deque(maxlen=self._max)
                while len(self._peers) > self._max_peers:
                    self._peers.popitem(last=False)
            else:
                self._peers.move_to_end(host)
            times.append(now)

    def __len__(self) -> int:
        """Peers remembered (bounded by max_peers)."""
        return len(self._peers)
