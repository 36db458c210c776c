"""The transport's defaults, in one place: the queue's signature, worker/spec.py's TransportSettings and
conf/transport/default.yaml all take theirs from here (tests/unit/test_transport_defaults.py checks the YAML)."""
from __future__ import annotations

SPIN_US = 200.0  # spin window (us) before sleeping on the futex: 50..1000 all measured better than no spin
SLOT_BYTES = 1 << 20  # payload bytes per slot of a queue created without arguments
SLOTS = 8  # slots per ring
MAX_MESSAGE_BYTES = 1 << 31  # a header announcing more than this is corrupt
