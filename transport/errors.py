"""Transport errors. Every blocking call raises one of these, never hangs."""
from __future__ import annotations


class TransportError(Exception):
    """Base class of the transport's errors."""


class QueueTimeout(TransportError, TimeoutError):
    """A blocking call ran past its timeout. ``pending`` names the readers that had not read (writer side)."""

    def __init__(self, message: str, pending: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.pending = pending


class QueueClosed(TransportError):
    """The queue was closed (by any party) or the wait was cancelled."""


class PeerDied(TransportError):
    """The other side of the queue is gone: a reader the writer waits for, or the writer a reader waits for."""

    def __init__(self, message: str, pid: int, reader: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid
        self.reader = reader


class CorruptMessage(TransportError):
    """A header or frame failed its bounds checks. Nothing was allocated from its claims."""
