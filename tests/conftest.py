"""Shared fixtures: every test that starts processes gets a hard timeout (pytest-timeout, with a faulthandler
dump) and the autouse leak check below."""
from __future__ import annotations

import faulthandler
import os
import shutil
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tests import leaks  # noqa: E402

faulthandler.enable()


def _terminal_dispositions() -> None:
    """The commands these tests start must begin as from a terminal's foreground job. A suite run as a background
    job of a script (``.ci/run &``) or under nohup inherits SIGINT/SIGQUIT/SIGHUP ignored, every process it starts
    would too, and the supervisor keeps an inherited ignore (supervisor/signals.py): the tests' Ctrl-Cs would
    vanish. Handlers set here are reset to the default in every program the suite executes."""
    import signal

    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGQUIT, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_IGN:
            signal.signal(sig, signal.SIG_DFL)


_terminal_dispositions()

# The trees these tests start (the command's runs, embedded ones) register in a registry of live trees of their own,
# not in the user's (supervisor/observe/live.py): `status` here never meets a tree of another session, and the
# user's own `status` never meets ours.
os.environ["RANKVISOR_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="rv-test-runtime-")


@pytest.fixture(scope="session", autouse=True)
def _own_runtime_dir():
    yield
    shutil.rmtree(os.environ["RANKVISOR_RUNTIME_DIR"], ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _warm_helpers():
    """Start multiprocessing's forkserver (with our preload) and resource tracker once, before any baseline is
    taken: they live for the whole session and their descriptors are not leaks."""
    from supervisor.backends.local import startmethod

    ctx = startmethod.context("forkserver", ("torch",))
    p = ctx.Process(target=os.getpid)
    p.start()
    p.join(60)
    p.close()
    yield


@pytest.fixture(autouse=True)
def no_leaks(request, capfd):
    """Fail the test if it leaves a process, a /dev/shm entry, a descriptor or a thread behind, or if anything
    printed a resource-tracker 'leaked' warning."""
    before = leaks.Snapshot.take()
    yield
    problems = leaks.leftovers(before)
    err = capfd.readouterr().err
    if "leaked" in err and "resource_tracker" in err:
        problems.append("resource tracker warned about leaked resources:\n" + err[-2000:])
    if problems:
        leaks.kill_extra(before)
        pytest.fail("left behind: " + "; ".join(problems), pytrace=False)
