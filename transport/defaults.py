"""The transport's defaults, in one place: the queue's signature, worker/spec.py's TransportSettings and
conf/transport/default.yaml all take theirs from here (tests/unit/test_transport_defaults.py checks they agree).

Geometry: a tree needs one broadcast ring per group plus one reply ring per rank. A container's /dev/shm is
64 MiB by default (Docker), and at tp=8 that must hold 1 broadcast + 8 reply rings with room to spare. Requests
(broadcast) may carry inputs, so that ring keeps 8 MiB; replies are mostly small, and a big one streams through
a small ring at the reader's pace, so a reply ring is 1 MiB: 8 + 8 x 1 = ~16 MiB at tp=8 (it was 72 MiB).
"""
from __future__ import annotations

SPIN_US = 200.0  # spin window (us) before sleeping on the futex: 50..1000 all measured better than no spin
SLOT_BYTES = 1 << 20  # payload bytes per slot of a broadcast (request) ring
SLOTS = 8  # slots per broadcast ring
REPLY_SLOT_BYTES = 256 << 10  # payload bytes per slot of a worker's reply ring
REPLY_SLOTS = 4  # slots per reply ring
MAX_MESSAGE_BYTES = 1 << 31  # a header announcing more than this is corrupt
