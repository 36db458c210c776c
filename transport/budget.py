"""How much shared memory a set of rings needs, and whether /dev/shm has it: the pre-flight check.

A supervisor calls ``preflight`` before it starts any process, so that a layout that cannot fit fails with one
line (what it needs, what is free, which keys to lower, ``--shm-size``) instead of a rank dying of SIGBUS or a
ring failing to be created half-way through start-up. The transport knows nothing about ranks: the caller says
how many broadcast rings of how many readers, and how many 1-reader reply rings, it will create.
"""
from __future__ import annotations

from dataclasses import dataclass

from transport import layout as L, shm

HEADROOM = 2  # suggest --shm-size for this many times the need: other users of /dev/shm (NCCL, torch) need room too
_SUGGEST_ROUND = 64 << 20  # round the suggestion up to whole 64 MiB steps


@dataclass(frozen=True)
class Geometry:
    """One kind of ring: ``count`` rings of ``readers`` readers, ``slots`` x ``slot_bytes`` each. ``keys`` names the
    settings that size it (for the error message)."""

    count: int
    readers: int
    slots: int
    slot_bytes: int
    keys: tuple[str, str]

    def check(self) -> None:
        """ValueError naming the key, for a geometry the ring layout refuses."""
        try:
            L.Layout(self.readers, self.slots, self.slot_bytes).check()
        except ValueError as exc:
            key = self.keys[0] if "slots" in str(exc) else self.keys[1]
            raise ValueError(f"{key}: {exc}") from None

    @property
    def bytes(self) -> int:
        return self.count * L.Layout(self.readers, self.slots, self.slot_bytes).size


def need_bytes(rings: list[Geometry]) -> int:
    return sum(g.bytes for g in rings)


def shortfall(rings: list[Geometry], free: int | None = None, where: str = shm.SHM_DIR) -> str | None:
    """None if the rings fit in ``where`` (free space ``free``, default: measured now); else the one-line reason."""
    for g in rings:
        g.check()
    need = need_bytes(rings)
    free = shm.free_bytes(where) if free is None else free
    if need <= free:
        return None
    keys = ", ".join(k for g in sorted(rings, key=lambda g: -g.bytes) for k in g.keys)
    suggest = -(-need * HEADROOM // _SUGGEST_ROUND) * _SUGGEST_ROUND >> 20
    return (f"the shared-memory rings need {shm.mib(need)} of {where} but {shm.mib(free)} is free: lower {keys}, "
            f"or give the container more (docker run --shm-size={suggest}m, or --ipc=host)")


def preflight(rings: list[Geometry]) -> str | None:
    """What a supervisor calls before starting anything: geometry checks (ValueError naming the key), then, for
    named segments only, the /dev/shm budget. Anonymous segments (transport/shm.py) are not files in /dev/shm: its
    size does not bound them (they count as the processes' shared memory)."""
    for g in rings:
        g.check()
    return None if shm.anonymous_default() else shortfall(rings)
