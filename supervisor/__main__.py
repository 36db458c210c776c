"""`python -m supervisor [-m] [key=value ...]` (or `rankvisor ...`): a Hydra application that configures, starts the
tree, runs the workload and stops cleanly. `--help` lists the config groups, keys, exit codes and signals.

Exit codes: 0 done; 1 workers failed beyond the restart policy (or the workload failed its check); 2 bad
configuration (one line naming the key or flag); 128+signal when stopped by a signal. A fatal child death is never
reported as 0. Signals: supervisor/signals.py (graceful, then forced on the second; SIGQUIT forced; SIGUSR1 stacks;
SIGUSR2 rolling restart).

This module stays tiny and imports almost nothing before it has (1) made sure our own packages are the ones imported
(supervisor/paths.py),
(2) installed the signal handlers and (3) started the forkserver, so that the forkserver's torch import overlaps with
Hydra composing the config (supervisor/cli.py).
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    from supervisor.signals import SignalState

    signals = SignalState()
    signals.install()  # first: a signal at any later instant is honoured
    from supervisor.paths import ours_first

    problem = ours_first()  # before anything imports worker or transport
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args and args[0] == "status":  # `python -m supervisor status [RUN_DIR]`: another shell's view of a run
        from supervisor.observe import status_cli

        return status_cli.main(args[1:])
    from supervisor import cli
    from supervisor.backends.local import startmethod

    startmethod.prestart(args)
    code = cli.main(args, signals, on_exit=startmethod.stop_helpers)
    return signals.exiting(code)


def entry() -> None:
    """The `rankvisor` console script."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
