"""Shared-memory transport: one-writer, N-reader rings with adaptive waiting. Standard library only."""
from transport.errors import CorruptMessage, PeerDied, QueueClosed, QueueTimeout, TransportError
from transport.message_queue import Handle, MessageQueue
from transport.shm import sweep_dead, sweep_owner

__all__ = [
    "CorruptMessage", "Handle", "MessageQueue", "PeerDied", "QueueClosed", "QueueTimeout", "TransportError",
    "sweep_dead", "sweep_owner",
]
