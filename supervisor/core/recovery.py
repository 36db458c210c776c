"""What a rank's death leaves ready for its replacement: the decisions, apart from the mechanism
(supervisor/backends/local/reserve.py). Pure functions, table-tested (tests/unit/test_recovery.py).

::

    | recovery.keeper | the worker class keeps weights | restart policy | backend | keeper |
    |-----------------|--------------------------------|----------------|---------|--------|
    | off             | any                            | any            | any     | no     |
    | on              | yes                            | any            | local   | yes    |
    | on              | no / backend=ray               |                |         | config error (one line) |
    | auto            | yes                            | not never      | local   | yes    |
    | auto            | otherwise                      |                |         | no     |

    | recovery.standby | keeper | standby |      recovery.standby=on needs the local backend; it works with or
    |------------------|--------|---------|      without a keeper (without one, a standby loads its own weights
    | off              | any    | no      |      while it warms up, before any death)
    | on               | any    | yes     |
    | auto             | yes    | yes     |
    | auto             | no     | no      |

A keeper that dies: where the ranks' mappings hold the memory themselves (a memfd on CPU, VMM handles on CUDA), the
ranks go on serving from them and the next restart starts a new keeper, which loads again (until the old mappings
are gone both copies are resident). Where they do not (legacy cudaIpc), every rank mapping the dead keeper's memory
is stopped at once, before another call can read freed memory, and the restart policy replaces them: one restart.
"""
from __future__ import annotations

import enum

from supervisor.settings import Backend, RecoverySettings, Strategy, Toggle

STANDBY_BACKOFF_MAX_S = 30.0


class KeeperLoss(enum.Enum):
    RELOAD_LATER = "reload_later"  # the ranks keep serving from their own mappings; a new keeper at the next need
    STOP_RANKS = "stop_ranks"  # the ranks' weights died with it: stop them now, the restart policy replaces them


def keeper_wanted(s: RecoverySettings, keeps_weights: bool, strategy: Strategy, backend: Backend) -> bool:
    if s.keeper is Toggle.off:
        return False
    if s.keeper is Toggle.on:
        return True  # refused by the config check where it cannot work (recovery_problem)
    return keeps_weights and strategy is not Strategy.never and backend is Backend.local


def standby_wanted(s: RecoverySettings, keeper: bool, backend: Backend) -> bool:
    if s.standby is Toggle.auto:
        return keeper and backend is Backend.local
    return s.standby is Toggle.on


def recovery_problem(s: RecoverySettings, keeps_weights: bool, backend: Backend) -> tuple[str, str] | None:
    """(key, problem) for a setting that cannot work, for the config check's one line; None if it can."""
    if backend is not Backend.local:
        for key in ("keeper", "standby"):
            if getattr(s, key) is Toggle.on:
                return f"recovery.{key}", "needs backend=local (the processes of a Ray backend are Ray's)"
    if s.keeper is Toggle.on and not keeps_weights:
        return "recovery.keeper", "the worker class keeps no weights (it defines no weights_key)"
    return None


def on_keeper_loss(mappings_outlive_keeper: bool) -> KeeperLoss:
    return KeeperLoss.RELOAD_LATER if mappings_outlive_keeper else KeeperLoss.STOP_RANKS


def standby_backoff_s(initial_s: float, failures: int) -> float:
    """Delay before replacing a standby that died while waiting, after ``failures`` such deaths in a row (reset
    once a standby is ready): a standby that cannot warm up must not become a busy loop."""
    if failures <= 0:
        return 0.0
    return min(initial_s * 2 ** (failures - 1), STANDBY_BACKOFF_MAX_S)
