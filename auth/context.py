"""The identity of the call being served, for HTTP routes that decide what it may read.

The metering core binds it around the handler (``MeteredCall.activate``); routes read it
with :func:`current_identity`. None: authentication is off, or the call is open (health).
"""

from __future__ import annotations

import contextvars

from auth.roles import Identity

__all__ = ["bind_identity", "current_identity", "reset_identity"]

_current: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "paddle_meter_identity", default=None
)


def current_identity() -> Identity | None:
    """The authenticated identity of the current call, if any."""
    return _current.get()


def bind_identity(identity: Identity | None) -> contextvars.Token[Identity | None]:
    return _current.set(identity)


def reset_identity(token: contextvars.Token[Identity | None]) -> None:
    _current.reset(token)
