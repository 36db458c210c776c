"""The tree in a container-sized /dev/shm (issue 14 part 2): a private mount namespace with a 64 MiB tmpfs on
/dev/shm, Docker's default. The default geometry fits at tp=8; a layout that does not fit is refused before any
process starts (exit 2, one line); a segment that does not fit is an exception at creation, never a SIGBUS.
Fault-matrix rows 41 (small /dev/shm) and 42 (kill -9 of everything during start-up) live here."""
from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest

from tests.integration.helpers import REPO
from transport import budget, shm
from transport.defaults import REPLY_SLOT_BYTES, REPLY_SLOTS, SLOT_BYTES, SLOTS

DOCKER_SHM = "64m"
_ENV = {**os.environ, "PYTHONPATH": REPO}


@functools.lru_cache(maxsize=1)
def _namespace_refused() -> str:
    """Why a private /dev/shm cannot be mounted here ("" if it can): needs root (or a user namespace) and unshare."""
    try:
        r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs -o size=1m tmpfs /dev/shm"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare unavailable: {exc}"
    return "" if r.returncode == 0 else f"cannot mount a private tmpfs on /dev/shm: {r.stderr.strip()}"


def in_small_shm(size: str, *argv: str, timeout: float = 120, named: bool = True) -> subprocess.CompletedProcess:
    """Run ``argv`` with /dev/shm a fresh ``size`` tmpfs that only it sees; afterwards list what it left there.
    ``named``: the rings are /dev/shm files (RV_SHM_NAMED=1), the case a small /dev/shm constrains."""
    reason = _namespace_refused()
    if reason:
        pytest.skip(reason)
    script = f"mount -t tmpfs -o size={size} tmpfs /dev/shm && \"$@\"; rc=$?; echo LEFT: $(ls -A /dev/shm); exit $rc"
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *argv],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**_ENV, shm.NAMED_ENV: "1" if named else "0"})


def _cli(tmp_path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "supervisor", "worker=echo", "workload=echo", "logging.level=WARNING",
            f"hydra.run.dir={tmp_path}/run", *overrides]


@pytest.mark.parametrize("method,named", [("spawn", True), ("forkserver", True), ("forkserver", False)])
def test_default_tree_at_tp8_runs_in_a_64_mib_dev_shm(tmp_path, method, named):
    """Named segments live in /dev/shm and must fit it; anonymous ones (the default) do not touch it at all."""
    r = in_small_shm(DOCKER_SHM, *_cli(tmp_path, "parallel.tp=8", f"runtime.start_method={method}"), named=named)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "echo check" in r.stdout and "PASS" in r.stdout, r.stdout
    assert r.stdout.rstrip().endswith("LEFT:"), "segments left in /dev/shm: " + r.stdout


def test_a_layout_that_does_not_fit_is_refused_before_any_process_starts(tmp_path):
    r = in_small_shm(DOCKER_SHM, *_cli(tmp_path, "parallel.tp=8", "transport.reply_slots=8",
                                       "transport.reply_slot_bytes=1048576"))
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    line = errors[0]
    for part in ("72.0 MiB", "64.0 MiB is free", "transport.reply_slots", "transport.slot_bytes", "--shm-size="):
        assert part in line, line
    assert "Traceback" not in r.stderr and "rank" not in line
    assert not (tmp_path / "run" / "ranks").exists() or not os.listdir(tmp_path / "run" / "ranks")


_CREATE_TOO_BIG = (
    "import sys\n"
    "from transport import MessageQueue, shm\n"
    "try:\n"
    "    MessageQueue(1, 1 << 20, 32)\n"
    "except shm.ShmFull as exc:\n"
    "    print('REFUSED', exc); sys.exit(0)\n"
    "sys.exit('created a 32 MiB ring in a 16 MiB /dev/shm')\n"
)


def test_a_full_dev_shm_is_an_exception_at_creation_not_a_sigbus():
    r = in_small_shm("16m", sys.executable, "-c", _CREATE_TOO_BIG)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr[-2000:])  # -7 would be SIGBUS
    assert "REFUSED no room in /dev/shm for a 32.0 MiB ring" in r.stdout, r.stdout
    assert r.stdout.rstrip().endswith("LEFT:"), r.stdout


def test_default_geometry_leaves_room_in_a_64_mib_dev_shm():
    need = budget.need_bytes([budget.Geometry(1, 8, SLOTS, SLOT_BYTES, ("a", "b")),
                              budget.Geometry(8, 1, REPLY_SLOTS, REPLY_SLOT_BYTES, ("c", "d"))])
    assert need <= (64 << 20) // 2, shm.mib(need)  # at tp=8 dp=1: at most half of Docker's default
    assert REPLY_SLOT_BYTES * REPLY_SLOTS < SLOT_BYTES * SLOTS


def test_shortfall_names_the_biggest_rings_keys_first_and_a_shm_size():
    rings = [budget.Geometry(1, 2, 4, 4096, ("transport.slots", "transport.slot_bytes")),
             budget.Geometry(2, 1, 64, 1 << 20, ("transport.reply_slots", "transport.reply_slot_bytes"))]
    assert budget.shortfall(rings, free=1 << 30) is None
    line = budget.shortfall(rings, free=1 << 20)
    assert line.index("transport.reply_slots") < line.index("transport.slots"), line
    assert "--shm-size=320m" in line and "\n" not in line  # 2 x (128 MiB + headers), in whole 64 MiB steps
    with pytest.raises(ValueError, match="transport.reply_slot_bytes"):
        budget.shortfall([budget.Geometry(1, 1, 4, 1000, ("transport.reply_slots", "transport.reply_slot_bytes"))])


SOAK_ROUNDS = 20  # scripts/shm_soak.py runs 200


@pytest.mark.timeout(300)
def test_kill_9_of_the_whole_tree_at_random_instants_of_start_up_leaves_nothing_in_dev_shm(tmp_path):
    """Issue 14 part 3: SIGKILL the supervisor and every worker at once, at a random instant of start-up: no
    segment of theirs is in /dev/shm (anonymous segments have no name to leave) and no process survives."""
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    try:
        import shm_soak
    finally:
        sys.path.remove(os.path.join(REPO, "scripts"))
    import random

    seed = random.SystemRandom().randrange(1 << 31)
    rng = random.Random(seed)
    trees = []
    for i in range(SOAK_ROUNDS):
        r = shm_soak.one_round(rng, str(tmp_path), tp=2, window_s=2.0)
        assert r.left_segments == [] and r.survivors == [], (i, r, f"seed {seed}")
        trees.append(r.tree)
    assert max(trees) >= 3, f"no round caught the workers alive (tree sizes {trees}): the instants missed start-up"
