"""rankvisor-run --nnodes: N launchers on this host are N nodes of one job (each its own process tree and run folder;
one rendezvous store, on a free port). Where a cut link must be real, each node gets a network namespace of its
own, joined by a bridge in another one (``unshare -n``, root only: skipped elsewhere).

The rank script is tests/integration/launch_scripts/steps.py (no torch: the launchers keep the CPU), except where a
collective must be broken: resume.py on gloo.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from tests.integration.helpers import REPO, gone_within, reap_adopted

SCRIPTS = os.path.join(REPO, "tests", "integration", "launch_scripts")
RUN_TIMEOUT_S = 90
pytestmark = pytest.mark.timeout(240)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nodes:
    """``n`` rankvisor-run processes of one job; node i runs in tmp_path/node<i> (its run folder, its output)."""

    def __init__(self, tmp_path, n: int, *flags: str, script: str = "steps.py", env: dict | None = None,
                 host: str = "127.0.0.1", wrap=None, node_flags=None, hold: bool = False) -> None:
        self.out = str(tmp_path)
        if hold:  # steps.py keeps stepping while it exists: release() lets the ranks finish
            open(os.path.join(self.out, "hold"), "w").close()
        self.port = free_port()
        self.procs, self.tree, self.owner = [], [], {}
        self.cmd = [sys.executable, "-m", "supervisor.launch.cli", "--nproc-per-node=2", "--rdzv-backend=c10d",
                    f"--rdzv-endpoint={host}:{self.port}", "--rdzv-id=test", *flags]
        self.script, self.wrap, self.node_flags = os.path.join(SCRIPTS, script), wrap, node_flags
        self.env = {**os.environ, "OUT_DIR": self.out, "PYTHONPATH": REPO, **(env or {})}
        for _ in range(n):
            self.add()

    def add(self) -> int:
        """Start one more node (a late one, when the others run already); its index."""
        i = len(self.procs)
        cwd = os.path.join(self.out, f"node{i}")
        os.makedirs(cwd)
        cmd = [*self.cmd, *(self.node_flags(i) if self.node_flags else []), self.script]
        with open(os.path.join(cwd, "stdout"), "w") as o, open(os.path.join(cwd, "stderr"), "w") as e:
            self.procs.append(subprocess.Popen(self.wrap(i, cmd) if self.wrap else cmd, cwd=cwd, env=self.env,
                                               stdout=o, stderr=e))
        return i

    # -- what the nodes wrote -------------------------------------------------------------------------------------
    def ups(self, restart: int) -> dict[int, dict]:
        got = {}
        for path in glob.glob(os.path.join(self.out, f"up.*.{restart}.json")):
            got[int(os.path.basename(path).split(".")[1])] = json.load(open(path))
        return got

    def wait_ups(self, restart: int, count: int, timeout: float = 60, world: int | None = None) -> dict[int, dict]:
        """``count`` ranks up with that restart count (in a world of ``world`` ranks, if given)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = {r: u for r, u in self.ups(restart).items() if world is None or u["WORLD_SIZE"] == str(world)}
            if len(got) >= count:
                self.snapshot_tree()
                return got
            time.sleep(0.05)
        raise AssertionError(f"{count} ranks of restart {restart} not up within {timeout} s: {sorted(got)}\n"
                             + self.stderr_tails())

    def wait_stepped(self, ranks: int, timeout: float = 60) -> None:
        """Every rank of ``ranks`` has a snapshot (one step or more): a kill after this has something to resume."""
        paths = [os.path.join(self.out, f"snap.{r}") for r in range(ranks)]
        _until(lambda: all(os.path.exists(p) for p in paths), timeout)

    def release(self) -> None:
        os.remove(os.path.join(self.out, "hold"))

    def events(self, i: int) -> list[dict]:
        return [json.loads(line) for line in open(os.path.join(self.run_dir(i), "events.jsonl"))]

    def job_event(self, i: int, kind: str) -> list[dict]:
        return [e for e in self.events(i) if e["kind"] == kind]

    def run_dir(self, i: int) -> str:
        (path,) = glob.glob(os.path.join(self.out, f"node{i}", "outputs", "*", "*"))
        return path

    def stderr(self, i: int) -> str:
        return open(os.path.join(self.out, f"node{i}", "stderr")).read()

    def stdout(self, i: int) -> str:
        return open(os.path.join(self.out, f"node{i}", "stdout")).read()

    def stderr_tails(self) -> str:
        return "\n".join(f"--- node{i} stderr ---\n{self.stderr(i)[-1500:]}" for i in range(len(self.procs)))

    def launcher_of(self, pid: int) -> int:
        """Which launcher's tree holds (or held, when the ranks were last seen up) ``pid``."""
        self.snapshot_tree()
        if pid not in self.owner:
            raise AssertionError(f"pid {pid} is under no launcher")
        return self.owner[pid]

    def hosting(self) -> int:
        return next(i for i in range(len(self.procs)) if self.job_event(i, "job_started")[0]["hosting"])

    # -- ending ---------------------------------------------------------------------------------------------------
    def snapshot_tree(self) -> None:
        for i, p in enumerate(self.procs):
            try:
                below = psutil.Process(p.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            self.tree += below
            self.owner.update((c.pid, i) for c in below)

    def finish(self, timeout: float = RUN_TIMEOUT_S) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(max(0.1, deadline - time.monotonic())) for p in self.procs]
        finally:
            self.close()

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait(10)
        reap_adopted(self.tree)


def steps_env(**extra: str) -> dict:
    return {"STEPS": "10", **extra}


@pytest.mark.parametrize("backend", ["c10d", "static"])
def test_every_rank_of_every_node_gets_torchruns_environment(tmp_path, backend):
    port_flags = (lambda i: [f"--node-rank={i}"]) if backend == "static" else None
    nodes = Nodes(tmp_path, 2, "--nnodes=2", "--max-restarts=3", f"--rdzv-backend={backend}", env=steps_env(),
                  node_flags=port_flags)
    codes = nodes.finish()
    assert codes == [0, 0], nodes.stderr_tails()
    ups = nodes.ups(0)
    assert sorted(ups) == [0, 1, 2, 3]
    masters = {(u["MASTER_ADDR"], u["MASTER_PORT"]) for u in ups.values()}
    assert len(masters) == 1  # one world: global rank 0's store, the same address everywhere
    for rank, u in ups.items():
        group = rank // 2
        assert (u["RANK"], u["ROLE_RANK"], u["LOCAL_RANK"]) == (str(rank), str(rank), str(rank % 2))
        assert (u["WORLD_SIZE"], u["ROLE_WORLD_SIZE"], u["LOCAL_WORLD_SIZE"]) == ("4", "4", "2")
        assert (u["GROUP_RANK"], u["GROUP_WORLD_SIZE"]) == (str(group), "2")
        assert (u["TORCHELASTIC_RESTART_COUNT"], u["TORCHELASTIC_MAX_RESTARTS"]) == ("0", "3")
        assert u["TORCHELASTIC_RUN_ID"] == "test" and u["TORCHELASTIC_USE_AGENT_STORE"] == "False"
        assert u["TORCHELASTIC_ERROR_FILE"].endswith(f"attempt_0/{rank % 2}/error.json")
    if backend == "static":  # --node-rank is GROUP_RANK
        assert {i: nodes.job_event(i, "round_started")[0]["node"] for i in range(2)} == {0: 0, 1: 1}
    for i in range(2):
        assert "outcome                  done" in nodes.stdout(i)


def test_a_rank_killed_on_one_node_restarts_every_node_with_one_count_and_they_resume(tmp_path):
    """FAULTS row 54, on gloo: the killed rank's peers on the other node are inside a barrier with it."""
    nodes = Nodes(tmp_path, 2, "--nnodes=2", "--max-restarts=1", "--fast", script="resume.py",
                  env={"KILL_RANK": "3", "KILL_STEP": "2"})
    codes = nodes.finish()
    assert codes == [0, 0], nodes.stderr_tails()
    for rank in range(4):
        assert open(os.path.join(nodes.out, f"resumed.{rank}.0")).read() == "0"
        assert int(open(os.path.join(nodes.out, f"resumed.{rank}.1")).read()) > 0  # from the snapshot
        assert open(os.path.join(nodes.out, f"done.{rank}")).read() == "1"  # TORCHELASTIC_RESTART_COUNT, everywhere
    for i in range(2):
        (first, second) = nodes.job_event(i, "round_started")
        assert (first["restart_count"], second["restart_count"]) == (0, 1)
        (ended, done) = nodes.job_event(i, "round_ended")
        assert (ended["end"], ended["restarts"], ended["verdict"]) == ("rank_failed", 1, "next_round")
        assert "global ranks 2..3" in ended["detail"] and "SIGKILL" in ended["detail"]
        assert done["end"] == "done"


def test_a_spent_budget_fails_every_node_in_one_line_with_the_root_cause_where_it_failed(tmp_path):
    nodes = Nodes(tmp_path, 2, "--nnodes=2", "--max-restarts=0", script="raises.py", env={"FAIL_RANK": "3"})
    codes = nodes.finish()
    assert codes == [1, 1], nodes.stderr_tails()
    for i in range(2):
        last = nodes.stderr(i).strip().splitlines()[-1]
        assert last.startswith("error: node 1 (") and "the restart budget is spent" in last, last
    failed = next(i for i in range(2) if "raises.py FAILED" in nodes.stderr(i))
    root = nodes.stderr(failed).split("Root Cause (first observed failure):", 1)[1]
    assert "rank      : 3 (local_rank: 1)" in root and "boom from a torchrun script" in root


def test_a_lost_node_is_noticed_its_ranks_are_gone_and_the_others_go_on_with_min_max(tmp_path):
    """FAULTS row 55: kill -9 of a node's launcher with --nnodes=1:2, the ranks inside gloo all-reduces (their
    peers' death breaks them before the keep-alive tells: either way, one restart, and the lost node named)."""
    nodes = Nodes(tmp_path, 2, "--nnodes=1:2", "--max-restarts=1", "--fast", env=steps_env(GLOO="1"), hold=True)
    try:
        ups = nodes.wait_ups(0, 4)
        nodes.wait_stepped(4)  # else a kill under load can land before the first step: nothing to resume from
        survivor = nodes.hosting()  # the store's host is another test's
        victim = 1 - survivor
        dead = [u["pid"] for u in ups.values() if nodes.launcher_of(u["pid"]) == victim]
        group = int(next(u["GROUP_RANK"] for u in ups.values() if u["pid"] in dead))
        nodes.procs[victim].kill()
        assert gone_within(dead, 1.0) == []  # the launcher's ranks never outlive it
        again = nodes.wait_ups(1, 2)
        assert sorted(again) == [0, 1] and {u["WORLD_SIZE"] for u in again.values()} == {"2"}
        assert all(nodes.launcher_of(u["pid"]) == survivor for u in again.values())
        assert min(u["resumed_at"] for u in again.values()) > 0
        nodes.release()
        assert nodes.procs[survivor].wait(RUN_TIMEOUT_S) == 0, nodes.stderr_tails()
        (ended, _) = nodes.job_event(survivor, "round_ended")
        assert ended["restarts"] == 1 and ended["end"] in ("node_lost", "rank_failed")
        named = ended["nodes"] if ended["end"] == "node_lost" else nodes.job_event(survivor, "node_lost")[0]["nodes"]
        assert named == [group]
    finally:
        nodes.close()


def test_a_lost_node_without_room_fails_the_job_in_one_line_naming_it(tmp_path):
    nodes = Nodes(tmp_path, 2, "--nnodes=2", "--max-restarts=3", "--fast", env=steps_env(GLOO="1"), hold=True)
    try:
        ups = nodes.wait_ups(0, 4)
        survivor = nodes.hosting()
        victim = 1 - survivor
        group = next(u["GROUP_RANK"] for u in ups.values() if nodes.launcher_of(u["pid"]) == victim)
        nodes.procs[victim].kill()
        assert nodes.procs[survivor].wait(RUN_TIMEOUT_S) == 1
        err = nodes.stderr(survivor).strip().splitlines()[-1]
        assert err.startswith(f"error: lost node {group} (") and "1 node(s) left, --nnodes needs at least 2" in err, err
        assert gone_within([u["pid"] for u in ups.values()], 1.0) == []
    finally:
        nodes.close()


def test_the_store_hosts_launcher_killed_the_standby_takes_over(tmp_path):
    """FAULTS row 56: kill -9 of the launcher that hosts the rendezvous store (its port then refuses)."""
    nodes = Nodes(tmp_path, 2, "--nnodes=1:2", "--max-restarts=1", env=steps_env(), hold=True)
    try:
        nodes.wait_ups(0, 4)
        host = nodes.hosting()
        nodes.procs[host].kill()
        survivor = 1 - host
        again = nodes.wait_ups(1, 2)
        assert all(nodes.launcher_of(u["pid"]) == survivor for u in again.values())
        nodes.release()
        assert nodes.procs[survivor].wait(RUN_TIMEOUT_S) == 0, nodes.stderr_tails()
        (failover,) = nodes.job_event(survivor, "store_failover")
        assert failover["closed"] is True and failover["survivors"] == 1
        assert failover["to"] == nodes.job_event(survivor, "job_started")[0]["standby"]
    finally:
        nodes.close()


def test_a_frozen_store_host_among_three_nodes_the_other_two_go_on_and_it_stops_when_it_wakes(tmp_path):
    """The store's host stops answering (SIGSTOP of its launcher: a frozen machine, as the others see it). The two
    others are a majority: they go on through the standby. Woken, the old host finds itself alone, not a majority,
    and stops instead of training apart."""
    nodes = Nodes(tmp_path, 3, "--nnodes=1:3", "--max-restarts=2", env=steps_env(), hold=True)
    try:
        nodes.wait_ups(0, 6)
        host = nodes.hosting()
        os.kill(nodes.procs[host].pid, signal.SIGSTOP)
        again = nodes.wait_ups(1, 4)
        assert {nodes.launcher_of(u["pid"]) for u in again.values()} == set(range(3)) - {host}
        os.kill(nodes.procs[host].pid, signal.SIGCONT)
        assert nodes.procs[host].wait(RUN_TIMEOUT_S) == 1
        nodes.release()
        last = nodes.stderr(host).strip().splitlines()[-1]
        assert "1 of 3 nodes left here, not a majority" in last, last
        for i in set(range(3)) - {host}:
            assert nodes.procs[i].wait(RUN_TIMEOUT_S) == 0, nodes.stderr_tails()
            (failover,) = nodes.job_event(i, "store_failover")
            assert failover["closed"] is False and failover["survivors"] == 2
    finally:
        nodes.close()


def test_a_late_node_joins_in_a_new_round_not_a_restart_and_a_stopped_node_stops_the_job(tmp_path):
    """--nnodes=1:2: node 0 runs alone; node 1 comes, waits (torch's wait list), and the next round has both, with
    the restart count unchanged (membership changes are not retries). Status from another shell shows the job.
    SIGTERM to node 1 then stops the job on every node (torchrun's rule): 143 there, one line and 1 on node 0."""
    nodes = Nodes(tmp_path, 1, "--nnodes=1:2", "--max-restarts=1", env=steps_env(), hold=True)
    try:
        nodes.wait_ups(0, 2, world=2)
        nodes.add()
        both = nodes.wait_ups(0, 4, world=4)
        assert {u["TORCHELASTIC_RESTART_COUNT"] for u in both.values()} == {"0"}
        assert {nodes.launcher_of(u["pid"]) for u in both.values()} == {0, 1}
        (ended,) = nodes.job_event(0, "round_ended")
        assert (ended["end"], ended["restarts"], ended["verdict"]) == ("nodes_joining", 0, "next_round")
        status = subprocess.run([sys.executable, "-m", "supervisor", "status", nodes.run_dir(0), "--json"],
                                env=nodes.env, capture_output=True, text=True, timeout=60)
        job = json.loads(status.stdout)["job"]
        assert (len(job["nodes"]), job["world_size"], job["restart_count"], job["max_restarts"]) == (2, 4, 0, 1)
        nodes.procs[1].send_signal(signal.SIGTERM)
        assert nodes.procs[1].wait(RUN_TIMEOUT_S) == 128 + signal.SIGTERM
        assert nodes.procs[0].wait(RUN_TIMEOUT_S) == 1
        last = nodes.stderr(0).strip().splitlines()[-1]
        assert last.startswith("error: the job was stopped: node ") and "stopped by SIGTERM" in last, last
        assert gone_within([u["pid"] for u in both.values()], 1.0) == []
    finally:
        nodes.close()


class Network:
    """A switch (a bridge in a network namespace of its own) and a namespace per node on 10.X.Y.0/24, joined by veth
    pairs. Nothing changes in this host's own namespace; every namespace goes with the process that holds it."""

    def __init__(self, n: int) -> None:
        import random

        self.subnet = f"10.{random.randrange(100, 250)}.{random.randrange(1, 250)}"
        self.holders = [subprocess.Popen(["unshare", "-n", "sleep", "600"]) for _ in range(n + 1)]
        self.switch, *self.nodes = [h.pid for h in self.holders]
        for h in self.holders:
            _until(lambda: os.readlink(f"/proc/{h.pid}/ns/net") != os.readlink("/proc/self/ns/net"))
        self.ip(self.switch, "link add br0 type bridge")
        self.ip(self.switch, "link set br0 up")
        for i, pid in enumerate(self.nodes):
            self.ip(self.switch, f"link add s{i} type veth peer name n{i}")
            self.ip(self.switch, f"link set n{i} netns {pid}")
            self.ip(self.switch, f"link set s{i} master br0")
            self.ip(self.switch, f"link set s{i} up")
            self.ip(pid, "link set lo up")
            self.ip(pid, f"addr add {self.addr(i)}/24 dev n{i}")
            self.ip(pid, f"link set n{i} up")

    @staticmethod
    def ip(pid: int, args: str) -> None:
        subprocess.run(["nsenter", "-t", str(pid), "-n", "ip", *args.split()], check=True, timeout=30)

    def addr(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    def wrap(self, i: int, cmd: list[str]) -> list[str]:
        return ["nsenter", "-t", str(self.nodes[i]), "-n", *cmd]

    def cut(self, i: int) -> None:
        """Node i's cable out of the switch: its packets go nowhere, nobody is told (no reset, no refusal)."""
        self.ip(self.switch, f"link set s{i} down")

    def close(self) -> None:
        for h in self.holders:
            h.kill()
            h.wait(10)


def _until(check, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.01)


def _netns_usable() -> bool:
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("unshare", "nsenter", "ip")):
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=30).returncode == 0


@pytest.mark.skipif(not _netns_usable(), reason="needs root and unshare -n (a network namespace per node)")
def test_a_cut_network_the_side_with_the_store_goes_on_the_other_stops_in_one_line(tmp_path):
    """FAULTS row 55, a real cut: node 1's link goes down (packets dropped, no reset). Node 0 hosts the store: it
    loses node 1 and goes on alone (--nnodes=1:2, half the round with the store on its side). Node 1 loses the store,
    finds only itself at its standby, half without the store: it stops in one line rather than train apart."""
    net = Network(2)
    nodes = None
    try:
        nodes = Nodes(tmp_path, 2, "--nnodes=1:2", "--max-restarts=1", env=steps_env(), hold=True, host=net.addr(0),
                      wrap=net.wrap, node_flags=lambda i: [f"--local-addr={net.addr(i)}",
                                                           f"--rdzv-conf=is_host={str(i == 0).lower()}"])
        ups = nodes.wait_ups(0, 4)
        cut = [u["pid"] for u in ups.values() if nodes.launcher_of(u["pid"]) == 1]
        net.cut(1)
        assert nodes.procs[1].wait(RUN_TIMEOUT_S) == 1
        last = nodes.stderr(1).strip().splitlines()[-1]
        assert "stopped answering" in last and "1 of 2 nodes left here, not a majority" in last, last
        assert gone_within(cut, 1.0) == []
        again = nodes.wait_ups(1, 2)
        assert {nodes.launcher_of(u["pid"]) for u in again.values()} == {0}
        assert {u["MASTER_ADDR"] for u in again.values()} == {net.addr(0)}
        nodes.release()
        assert nodes.procs[0].wait(RUN_TIMEOUT_S) == 0, nodes.stderr_tails()
    finally:
        if nodes is not None:
            nodes.close()
        net.close()
