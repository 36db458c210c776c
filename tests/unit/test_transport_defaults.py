"""The transport's defaults live in transport/defaults.py; every other place that states one agrees with it."""
from __future__ import annotations

import inspect
import os

import yaml

from transport import defaults as D
from transport.message_queue import MessageQueue
from transport.writer import RingWriter
from worker.spec import TransportSettings

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_transport_settings_take_the_transports_defaults():
    t = TransportSettings()
    assert (t.slot_bytes, t.slots, t.reply_slot_bytes, t.reply_slots, t.spin_us, t.max_message_bytes) == (
        D.SLOT_BYTES, D.SLOTS, D.REPLY_SLOT_BYTES, D.REPLY_SLOTS, D.SPIN_US, D.MAX_MESSAGE_BYTES)


def test_queue_signatures_take_the_transports_defaults():
    for fn in (MessageQueue.__new__, RingWriter.__init__):
        p = inspect.signature(fn).parameters
        assert (p["max_chunk_bytes"].default, p["max_chunks"].default, p["max_message_bytes"].default) == (
            D.SLOT_BYTES, D.SLOTS, D.MAX_MESSAGE_BYTES)


def test_the_default_yaml_restates_no_transport_default():
    """conf/transport/default.yaml holds only what differs from the defaults (nothing, today)."""
    with open(os.path.join(REPO, "conf", "transport", "default.yaml")) as f:
        data = yaml.safe_load(f) or {}
    fields = TransportSettings.__dataclass_fields__
    restated = {k: v for k, v in data.items() if k in fields and v == fields[k].default}
    assert not restated, f"restates the defaults of transport/defaults.py: {restated}"
