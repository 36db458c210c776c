"""`python -m supervisor [-m] [key=value ...]` (or `rankvisor ...`): a Hydra application that configures, starts the
tree, runs the workload and stops cleanly. `--help` lists the config groups, keys, exit codes and signals.

Exit codes: 0 done; 1 workers failed beyond the restart policy (or the workload failed its check); 2 bad
configuration (one line naming the key or flag); 128+signal when stopped by a signal. A fatal child death is never
reported as 0. Signals: supervisor/signals.py (graceful, then forced on the second; SIGQUIT forced; SIGUSR1 stacks;
SIGUSR2 rolling restart).

This module stays tiny and imports almost nothing before it has (1) made sure our own packages are the ones imported,
(2) installed the signal handlers and (3) started the forkserver, so that the forkserver's torch import overlaps with
Hydra composing the config (supervisor/cli.py).
"""
from __future__ import annotations

import os
import sys

OUR_PACKAGES = ("supervisor", "worker", "transport")
SUPERVISORD_MARKER = "supervisord.py"  # supervisord's package is also called "supervisor"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    from supervisor.signals import SignalState

    signals = SignalState()
    signals.install()  # first: a signal at any later instant is honoured
    problem = _unshadow()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args and args[0] == "status":  # `python -m supervisor status [RUN_DIR]`: another shell's view of a run
        from supervisor.observe import status_cli

        return status_cli.main(args[1:])
    from supervisor import cli
    from supervisor.backends.local import startmethod

    startmethod.prestart(args)
    return cli.main(args, signals, on_exit=startmethod.stop_helpers)


def entry() -> None:
    """The `rankvisor` console script."""
    sys.exit(main())


# -- shadowing -----------------------------------------------------------------------------------------------------


def _unshadow() -> str | None:
    """`python -m` puts the current folder first on sys.path, so a `worker.py` or `transport/` there (common in users'
    projects) would be imported instead of our packages -- here and in every worker, which inherit sys.path. When
    that is the case, put the folder our `supervisor` package came from ahead of it: ours are then found first and
    the user's own modules in the current folder stay importable under their other names (worker.cls=mine:MyWorker).
    Returns one line when that still does not resolve it. The `rankvisor` script is immune (its sys.path[0] is bin/)."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shadowed = [name for name in OUR_PACKAGES[1:] if not _is_ours(importlib.util.find_spec(name), root)]
    if shadowed:
        sys.path[:] = [root] + [p for p in sys.path if os.path.abspath(p or ".") != root]
        importlib.invalidate_caches()
        still = [name for name in shadowed if not _is_ours(importlib.util.find_spec(name), root)]
        if still:
            where = _origin(importlib.util.find_spec(still[0]))
            return (f"{where} shadows rankvisor's '{still[0]}' package (installed in {root}); rename it or run from "
                    "another folder")
    if os.path.exists(os.path.join(root, "supervisor", SUPERVISORD_MARKER)):
        return (f"supervisord is installed over rankvisor in {root}/supervisor (both use the import name "
                "'supervisor'); install rankvisor in its own virtual environment")
    return None


def _is_ours(spec, root: str) -> bool:
    """Found, and in the installation our supervisor package came from (the editable finder maps there too)."""
    origin = _origin(spec)
    return origin is not None and os.path.abspath(origin).startswith(root + os.sep)


def _origin(spec) -> str | None:
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    return locations[0] if locations else spec.origin


if __name__ == "__main__":
    sys.exit(main())
