"""Security properties of a running tree (issue: reliability suite and chaos soak).

* Shared-memory segments are mode 0600, named ``rvq-<owner pid>-<random>`` with at least 64 random bits, never
  shared by two queues, even under a permissive umask.
* In a running tree the broadcast and reply segments are already unlinked from /dev/shm (every party has attached),
  so nobody else can open them: a third process that knows the exact name gets FileNotFoundError. Callables can
  therefore only be sent by the broadcast queue's writer, the supervisor.
* No socket of the tree (supervisor or any worker) listens beyond loopback.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading

import psutil
import pytest

from supervisor.api import Supervisor
from tests.integration.helpers import ECHO, REPO, config
from transport import MessageQueue, shm

pytestmark = pytest.mark.timeout(180)

NAME = re.compile(r"^rvq-(?P<pid>\d+)-(?P<rand>[0-9a-f]+)$")
SHM_MAP = re.compile(r"^(?P<start>[0-9a-f]+)-(?P<end>[0-9a-f]+) \S+ \S+ \S+ \S+\s+(?:/dev/shm/|/memfd:)(?P<name>rvq-\S+)"
                     r"(?P<deleted> \(deleted\))?$")


# -- helpers ------------------------------------------------------------------------------------------------------
def _tree_pids(sup: Supervisor) -> list[int]:
    pids = sup.pids()
    assert len(set(pids)) == len(pids) and all(psutil.pid_exists(p) for p in pids)
    return pids


def _mapped_segments(pid: int) -> dict[str, dict]:
    """rvq- segments mapped by ``pid``: name -> {"deleted": unlinked from /dev/shm?, "range": "start-end"}."""
    out = {}
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            m = SHM_MAP.match(line.rstrip("\n"))
            if m:
                out[m["name"]] = {"deleted": bool(m["deleted"]), "range": f"{m['start']}-{m['end']}"}
    return out


def _mapped_mode(pid: int, rng: str) -> int | None:
    """Mode bits of the object behind one mapping (works for unlinked files; needs CAP_SYS_ADMIN)."""
    try:
        return stat.S_IMODE(os.stat(f"/proc/{pid}/map_files/{rng}").st_mode)
    except (PermissionError, FileNotFoundError):
        return None


def _listening(pid: int) -> list:
    """Sockets of ``pid`` that accept connections or datagrams from elsewhere: TCP LISTEN and bound UDP."""
    p = psutil.Process(pid)
    conns = p.net_connections(kind="all") if hasattr(p, "net_connections") else p.connections(kind="all")
    out = []
    for c in conns:
        if c.family == socket.AF_UNIX:
            continue
        if (c.type == socket.SOCK_STREAM and c.status == psutil.CONN_LISTEN) or \
                (c.type == socket.SOCK_DGRAM and c.laddr and not c.raddr):
            out.append(c)
    return out


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


def _attach_from_third_process(name: str, size: int) -> dict:
    """Another process (not in the tree) that knows a segment's exact name and size tries to open it."""
    code = (
        "import json, os, sys\n"
        "from transport import shm\n"
        "name, size = sys.argv[1], int(sys.argv[2])\n"
        "out = {}\n"
        "for how in ('attach', 'open'):\n"
        "    try:\n"
        "        if how == 'attach':\n"
        "            shm.attach(name, size)\n"
        "        else:\n"
        "            os.close(os.open(os.path.join('/dev/shm', name), os.O_RDWR))\n"
        "        out[how] = 'opened'\n"
        "    except BaseException as exc:\n"
        "        out[how] = type(exc).__name__\n"
        "print(json.dumps(out))\n"
    )
    res = subprocess.run([sys.executable, "-c", code, name, str(size)], capture_output=True, text=True, cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=REPO), timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


# -- names and modes ----------------------------------------------------------------------------------------------
def test_segment_names_carry_the_owner_pid_and_64_random_bits():
    names = [shm.new_name() for _ in range(2000)]
    assert len(set(names)) == len(names)
    rands = []
    for n in names:
        m = NAME.match(n)
        assert m, n
        assert int(m["pid"]) == os.getpid() and shm.owner_pid(n) == os.getpid()
        assert len(m["rand"]) * 4 >= 64, f"{n}: only {len(m['rand']) * 4} random bits"
        rands.append(int(m["rand"], 16))
    # not a counter or a clock: consecutive names differ in about half of their 64 bits
    flips = [bin(a ^ b).count("1") for a, b in zip(rands, rands[1:])]
    assert 24 <= sum(flips) / len(flips) <= 40
    assert shm.new_name(12345).startswith("rvq-12345-")


def test_two_queues_never_share_a_name_and_an_existing_name_is_refused(monkeypatch):
    queues = []
    lock = threading.Lock()

    def make():
        q = MessageQueue(1, 4096, 2, named=True)  # /dev/shm names (anonymous segments have none to collide)
        with lock:
            queues.append(q)

    threads = [threading.Thread(target=make) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert len(queues) == 32 and len({q.name for q in queues}) == 32
        taken = queues[0].name
        monkeypatch.setattr(shm, "new_name", lambda owner_pid=None: taken)  # a collision, however unlikely
        with pytest.raises(FileExistsError):
            MessageQueue(1, 4096, 2, named=True)
    finally:
        for q in queues:
            q.close()


def test_segments_are_0600_even_under_a_permissive_umask():
    old = os.umask(0)
    try:
        q = MessageQueue(2, 4096, 2, named=True)  # anonymous segments have no file to stat (transport/shm.py)
    finally:
        os.umask(old)
    try:
        st = os.stat(os.path.join(shm.SHM_DIR, q.name))
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == os.getuid()
    finally:
        q.close()


def test_only_the_writer_end_can_enqueue():
    w = MessageQueue(1, 4096, 2)
    r = MessageQueue.create_from_handle(w.export_handle(), 0)
    try:
        with pytest.raises(RuntimeError, match="reader end"):
            r.enqueue("a callable would go here")
        w.enqueue("hello")
        assert r.dequeue(timeout=5) == "hello"
    finally:
        r.close()
        w.close()


# -- a running tree -----------------------------------------------------------------------------------------------
@pytest.fixture
def echo_tree():
    with Supervisor(config(*ECHO, "parallel.tp=2", "parallel.dp=2")) as sup:
        assert sup.collective_rpc("ping", timeout=30) == [0, 1, 2, 3]
        yield sup


def test_running_tree_has_unlinked_every_segment(echo_tree):
    sup = echo_tree
    pids = _tree_pids(sup)
    everyone = [os.getpid(), *pids]
    on_disk = [n for n in os.listdir(shm.SHM_DIR) if shm.owner_pid(n) in everyone]
    assert on_disk == [], f"segments of the running tree still in /dev/shm: {on_disk}"
    # ... and yet they are in use: the supervisor maps one broadcast segment per group (its own) and every
    # worker's reply segment; each worker maps its group's broadcast segment and its own reply segment.
    mine = _mapped_segments(os.getpid())
    bcast = {n for n in mine if shm.owner_pid(n) == os.getpid()}
    tree_bcasts = {sup.transport_handles(g.index)[0].name for g in sup.groups()}
    assert tree_bcasts <= bcast and len(tree_bcasts) == 2
    replies = {n for n in mine if shm.owner_pid(n) in pids}
    assert {shm.owner_pid(n) for n in replies} == set(pids)
    for n in tree_bcasts | replies:
        assert mine[n]["deleted"], f"{n} is mapped but still linked"
        mode = _mapped_mode(os.getpid(), mine[n]["range"])
        assert mode in (None, 0o600), f"{n} has mode {oct(mode)}"
    for pid in pids:
        theirs = _mapped_segments(pid)
        assert all(v["deleted"] for v in theirs.values()), theirs
        assert sum(shm.owner_pid(n) == pid for n in theirs) == 1  # its reply queue
        assert sum(n in tree_bcasts for n in theirs) == 1  # its group's broadcast queue


def test_a_third_process_cannot_attach_to_the_broadcast_or_reply_queues(echo_tree):
    """Knowing the exact name (more than an attacker can guess) is not enough: the name no longer exists."""
    sup = echo_tree
    handles = sup.transport_handles(0)
    for h in handles:
        assert _attach_from_third_process(h.name, h.size) == {"attach": "FileNotFoundError",
                                                              "open": "FileNotFoundError"}
    # The tree still works: only the supervisor, the broadcast queue's writer, sends calls (and callables).
    assert sup.collective_rpc(lambda w: os.getpid(), timeout=30) == sup.pids()


def test_rendezvous_directory_is_private(echo_tree):
    st = os.stat(echo_tree.rendezvous_dir)
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()


def test_no_socket_of_the_tree_listens_beyond_loopback():
    """The real model: gloo opens TCP sockets between the ranks of a group; all must be on loopback."""
    from worker.tp_mlp import make_input, reference_forward

    cfg = config("parallel.tp=2", "parallel.dp=2", "workload.hidden=64")
    with Supervisor(cfg) as sup:
        x = make_input(cfg.workload, 0)
        for g in range(2):  # every rank has talked to its peers: gloo's pairs are connected
            out = sup.execute_model(x, timeout=120, group=g)
            assert float((out - reference_forward(cfg.workload, x)).abs().max()) < 1e-4
        pids = _tree_pids(sup)
        found = {pid: _listening(pid) for pid in [os.getpid(), *pids]}
        total = sum(len(v) for v in found.values())
        wide = {pid: [f"{c.laddr.ip}:{c.laddr.port} ({'tcp' if c.type == socket.SOCK_STREAM else 'udp'})"
                      for c in conns if not _is_loopback(c.laddr.ip)] for pid, conns in found.items()}
        wide = {pid: v for pid, v in wide.items() if v}
        assert not wide, f"sockets listening beyond loopback: {wide}"
        print(f"{total} listening sockets in the tree, all on loopback")
