"""What each signal does to ``python -m supervisor``, at any instant of start-up, run or shutdown.

    | signal                  | first                                            | second (any of the three) |
    |-------------------------|--------------------------------------------------|---------------------------|
    | SIGINT, SIGTERM, SIGHUP | graceful stop, exit 128+N (SIGTERM drains calls  | forced stop at once (the  |
    |                         | in flight first, up to shutdown.drain_s)         | same one within 0.5 s is  |
    |                         |                                                  | the first, sent twice)    |
    | SIGQUIT                 | forced stop at once, exit 131                    |                           |
    | SIGUSR1                 | every rank dumps its Python stacks into its rank log, the supervisor into           |
    |                         | supervisor.log (faulthandler); one line on the console says where; the run goes on  |
    | SIGUSR2                 | rolling restart: the dp groups restart one by one, no call lost; the run goes on     |

A signal the command inherits as ignored stays ignored, as in any Unix tool (``if (signal(SIGINT, SIG_IGN) !=
SIG_IGN) ...``): SIGHUP under ``nohup`` (a run that should outlive the terminal), SIGINT and SIGQUIT in a background
job of a non-interactive shell (``cmd &`` in a script). Python itself keeps such a SIGINT ignored; installing our
handler over it would stop a nohup'ed tree at logout, and would lose a signal sent in the instant before the handler
exists. Stop such a run with SIGTERM.

A signal sent to the process group (a terminal's Ctrl-C, ``timeout``, ``kill -- -PGID``, systemd, Kubernetes) reads as
one signal: every other process of the tree lives in a session of its own and is started with those signals held
until it is there (worker/session.py), so the supervisor is the only one to act. One case still delivers a signal
to us twice: ``timeout`` sends it to the command and then to its whole group, and a script may kill the pid and the
group. The same signal again within ``shutdown.signal_window_s`` (0.5 s) of the first is taken as that first one,
not as the second that forces the stop: a machine repeats itself within microseconds, a person pressing Ctrl-C again
because the first seemed slow does so a second or more later. (Python's handlers cannot read the sender from the
signal, so time is what tells the two apart.)

"At any instant" is the point of this module: the handlers are installed before anything else happens (before the
config loads and the forkserver starts), and a stop that arrives before the tree exists is remembered (``stop``) and
checked at each step of start-up, so nothing starts after it. A stop that arrives while the tree starts is passed to
the supervisor at once (``request_shutdown``), which abandons the start-up. A forced stop kills every worker, then the
start method's helper processes, then exits -- nothing outlives the command.

Handlers run on the main thread between two bytecodes, possibly while it holds a lock the supervisor needs: what could
block (collecting pids, a rolling restart) is done on a short-lived thread instead.
"""
from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time
from typing import Any

GRACEFUL = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
FORCED = signal.SIGQUIT
INHERITED_IGNORE = (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP)  # what nohup and shells set to be ignored
DUMP_STACKS = signal.SIGUSR1  # also what the workers listen on (worker/main.py registers faulthandler for it)
ROLLING_RESTART = signal.SIGUSR2
FORCE_DEADLINE_S = 5.0  # a forced stop exits after this long even if its kills are stuck: the death pipes end the rest
SAME_SIGNAL_WINDOW_S = 0.5  # the default of shutdown.signal_window_s, which applies once the configuration is loaded


def exit_code(signum: int) -> int:
    return 128 + signum


class SignalState:
    """The CLI's signal handling. ``stop`` is set by the first stopping signal; ``signum`` says which one."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.signum: int | None = None
        self.first_at = 0.0  # time.monotonic() of the first stopping signal
        self.window_s = SAME_SIGNAL_WINDOW_S
        self.supervisor: Any = None  # set by the CLI as soon as the Supervisor object exists (before it starts)
        self._forcing = False
        self.ignored: frozenset[int] = frozenset()  # signals inherited as ignored, left so (install)

    def install(self) -> None:
        self.ignored = frozenset(sig for sig in INHERITED_IGNORE if signal.getsignal(sig) == signal.SIG_IGN)
        for sig in GRACEFUL:
            if sig not in self.ignored:
                signal.signal(sig, self._graceful)
        if FORCED not in self.ignored:
            signal.signal(FORCED, self._forced)
        signal.signal(DUMP_STACKS, self._dump_stacks)
        signal.signal(ROLLING_RESTART, self._rolling_restart)

    def exiting(self, code: int) -> int:
        """The command is about to exit with ``code``: the exit code is final from here, and a stop signal from now
        on is ignored (the interpreter's shutdown puts Python's handlers back to the default action, so a Ctrl-C
        landing there would kill the process with -SIGINT). A stop signal that came before, at whatever instant,
        turns a 0 into 128+N (a failure keeps its own code). Returns the code to exit with."""
        for sig in GRACEFUL:
            if sig not in self.ignored:
                signal.signal(sig, signal.SIG_IGN)
        return self.code if self.signum is not None and code == 0 else code

    def attach(self, sup: Any) -> bool:
        """Hand the tree to the handlers; False if a stop came first (then do not start it). The check comes after
        the assignment, so a signal in between is seen one way or the other."""
        self.window_s = sup.cfg.shutdown.signal_window_s
        self.supervisor = sup
        return not self.stop.is_set()

    @property
    def code(self) -> int | None:
        return exit_code(self.signum) if self.signum is not None else None

    def _graceful(self, signum: int, _frame: Any) -> None:
        now = time.monotonic()
        if self.signum is not None:
            if signum == self.signum and now - self.first_at < self.window_s:
                return  # the first one, delivered twice (see the module's docstring)
            self._force_exit()  # with the first signal's code
            return
        drain = signum == signal.SIGTERM  # a first SIGTERM drains calls in flight; any later signal skips it
        self.signum, self.first_at = signum, now
        self.stop.set()
        sup = self.supervisor
        if sup is not None:
            sup.request_shutdown(drain=drain)  # non-blocking: the main thread finishes the stop

    def _forced(self, signum: int, _frame: Any) -> None:
        self.signum = self.signum or signum
        self._force_exit()

    def _force_exit(self) -> None:
        """Kill every worker now, then the helper processes; exit with the code of the signal that stopped us.
        On a thread: the interrupted main thread may hold a lock the kills need, and must get on to release it."""
        if self._forcing:
            return
        self._forcing = True
        code = exit_code(self.signum or FORCED)
        deadline = threading.Timer(FORCE_DEADLINE_S, os._exit, [code])
        deadline.daemon = True
        deadline.start()
        threading.Thread(target=self._force_now, args=(code,), name="forced-stop", daemon=True).start()

    def _force_now(self, code: int) -> None:
        from supervisor.backends.local import startmethod

        _quiet_stderr(f"stopping at once ({signal.Signals(self.signum or FORCED).name}, exit {code}): "
                      "killing every worker")
        sup = self.supervisor
        if sup is not None:
            sup.force_stop()
        startmethod.stop_helpers()
        sys.stderr.flush()
        os._exit(code)

    def _dump_stacks(self, _signum: int, _frame: Any) -> None:
        threading.Thread(target=self._dump_now, name="dump-stacks", daemon=True).start()

    def _dump_now(self) -> None:
        """The stacks go into the logs (a hundred lines per process); the console gets one line saying where."""
        from loguru import logger

        sup = self.supervisor
        pids = sup.pids() if sup is not None else []
        run_dir = sup.cfg.logging.run_dir if sup is not None else ""
        log = os.path.join(run_dir, "supervisor.log") if run_dir else ""
        _dump_own_stacks(log, pids)
        for pid in pids:
            try:
                os.kill(pid, DUMP_STACKS)  # each rank's faulthandler writes into its rank log (worker/output.py)
            except ProcessLookupError:
                pass
        where = f"in {log}" if log else "above"
        rank_logs = os.path.join(run_dir, "ranks", "rank<N>.log")
        ranks = f", of {len(pids)} rank(s) in {rank_logs}" if pids and run_dir else ""
        logger.warning(f"SIGUSR1: Python stacks of the supervisor {where}{ranks}")

    def _rolling_restart(self, _signum: int, _frame: Any) -> None:
        sup = self.supervisor
        if sup is not None and self.signum is None:
            threading.Thread(target=sup.rolling_restart, kwargs={"wait": False}, name="rolling-restart",
                             daemon=True).start()  # the manager thread does it; progress is in the events


def _dump_own_stacks(log: str, pids: list[int]) -> None:
    """This process's stacks (faulthandler) into ``log``, under a header; onto stderr while there is no log yet."""
    if not log:
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        return
    with open(log, "a") as f:
        f.write(f"SIGUSR1: the supervisor's Python stacks (pid {os.getpid()}); ranks' stacks: pids {pids}\n")
        f.flush()
        faulthandler.dump_traceback(file=f, all_threads=True)


def _quiet_stderr(last_line: str) -> None:
    """One line, then nothing more on stderr: threads that were starting or stopping workers now fail in every way
    (their forkserver and workers are being killed under them); their reports still reach supervisor.log."""
    sys.stderr.write(last_line + "\n")
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
