"""Telling the kernel's OOM kills from other SIGKILLs (supervisor/backends/local/oomkill.py), on records in the kernel's
own formats: these lines were read from /dev/kmsg, dmesg, /proc/self/mountinfo and /proc/PID/cgroup of a machine where
a memory cgroup's limit made the OOM killer fire (tests/integration/test_gpu_faults.py makes it fire for real)."""
from __future__ import annotations

import os

import pytest

from supervisor.backends.local.oomkill import (KernelLog, Mount, OomWitness, counter_files, parse_kernel_record,
                                               parse_mountinfo, read_oom_kill)
from supervisor.core.exits import ExitInfo

KMSG_KILLED = ("3,1187,762891389,-;Memory cgroup out of memory: Killed process 31485 (python3) total-vm:82120kB, "
               "anon-rss:72308kB, file-rss:6660kB, shmem-rss:0kB, UID:0 pgtables:204kB oom_score_adj:0")
KMSG_SUMMARY = ("6,1186,762891371,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,"
                "oom_memcg=/process_api/f0e3/rvprobe,task_memcg=/process_api/f0e3/rvprobe,task=python3,pid=31485,uid=0")
DMESG_GLOBAL = ("[  812.004211] Out of memory: Killed process 4242 (dp0-pp0-tp1) total-vm:9120kB, anon-rss:7308kB, "
                "file-rss:0kB, shmem-rss:0kB, UID:1000 pgtables:20kB oom_score_adj:0")
NOT_OOM = [
    "6,1190,763000000,-;python3[31490]: segfault at 0 ip 00007f0 sp 00007ff error 4 in libc.so.6",
    "4,1191,763000001,-;Tasks state (memory values in pages):",
    "[  762.891367] [  31485]     0 31485    20530    19742    18077     1665         0   208896        0      0 python3",
    " SUBSYSTEM=memory",
]
MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
PROC_CGROUP_V1 = "9:name=systemd:/\n4:memory:/process_api/f0e3\n1:cpu:/\n0::/\n"


@pytest.mark.parametrize("line,pid,words", [
    (KMSG_KILLED, 31485, "Memory cgroup out of memory: Killed process 31485 (python3) total-vm:82120kB, "
                         "anon-rss:72308kB"),
    (KMSG_SUMMARY, 31485, "oom-kill:constraint=CONSTRAINT_MEMCG"),
    (DMESG_GLOBAL, 4242, "Out of memory: Killed process 4242 (dp0-pp0-tp1) total-vm:9120kB, anon-rss:7308kB"),
])
def test_oom_kill_records_name_the_pid(line, pid, words):
    found_pid, text = parse_kernel_record(line)
    assert found_pid == pid
    assert text.startswith(words)


@pytest.mark.parametrize("line", NOT_OOM)
def test_other_kernel_records_are_not_oom_kills(line):
    assert parse_kernel_record(line) is None


def test_mountinfo_gives_the_v2_and_v1_memory_mounts():
    mounts = parse_mountinfo(MOUNTINFO)
    assert mounts == {"memory": Mount("/sys/fs/cgroup/memory", "/", "memory.oom_control"),
                      "v2": Mount("/sys/fs/cgroup/unified", "/", "memory.events")}


def test_counter_files_follow_the_process_cgroups():
    files = counter_files(PROC_CGROUP_V1, parse_mountinfo(MOUNTINFO))
    assert files == ["/sys/fs/cgroup/memory/process_api/f0e3/memory.oom_control",
                     "/sys/fs/cgroup/unified/memory.events"]  # v2's root has no memory.events: read_oom_kill -> None


def test_counter_files_of_a_mount_showing_part_of_the_hierarchy():
    """A container's cgroup mount shows its own subtree (mount root /docker/abc), /proc/PID/cgroup the full path."""
    mounts = {"v2": Mount("/sys/fs/cgroup", "/docker/abc", "memory.events")}
    assert counter_files("0::/docker/abc/worker\n", mounts) == ["/sys/fs/cgroup/worker/memory.events"]


def test_read_oom_kill_from_v1_and_v2_files(tmp_path):
    v1 = tmp_path / "memory.oom_control"
    v1.write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    v2 = tmp_path / "memory.events"
    v2.write_text("low 0\nhigh 0\nmax 12\noom 2\noom_kill 2\noom_group_kill 0\n")
    assert (read_oom_kill(str(v1)), read_oom_kill(str(v2)), read_oom_kill(str(tmp_path / "none"))) == (3, 2, None)


def test_kernel_log_reads_only_records_written_after_it_opened(tmp_path):
    log = tmp_path / "kmsg"
    log.write_text(DMESG_GLOBAL + "\n")  # an older kill: before the supervisor started
    reader = KernelLog(str(log))
    reader.open()
    try:
        with open(log, "a") as f:
            f.write("\n".join([*NOT_OOM, KMSG_SUMMARY, KMSG_KILLED]) + "\n")
        assert reader.killed(4242) == ""
        assert reader.killed(31485).startswith("Memory cgroup out of memory: Killed process 31485")
        assert reader.killed(1) == ""
    finally:
        reader.close()


def test_an_unreadable_kernel_log_is_no_evidence(tmp_path):
    reader = KernelLog(str(tmp_path / "missing"))
    reader.open()
    assert not reader.readable and reader.killed(31485) == ""


def _fake_proc(tmp_path, pid: int, counter: str) -> OomWitness:
    """A /proc and a mountinfo whose v2 mount is ``tmp_path/cg``, with the worker in cgroup /w."""
    (tmp_path / "proc" / str(pid)).mkdir(parents=True)
    (tmp_path / "proc" / str(pid) / "cgroup").write_text("0::/w\n")
    (tmp_path / "cg" / "w").mkdir(parents=True)
    (tmp_path / "cg" / "w" / "memory.events").write_text(counter)
    (tmp_path / "mountinfo").write_text(f"41 31 0:38 / {tmp_path}/cg rw - cgroup2 cgroup2 rw\n")
    return OomWitness(kmsg=str(tmp_path / "no-kmsg"), proc=str(tmp_path / "proc"),
                      mountinfo=str(tmp_path / "mountinfo"))


def test_the_cgroup_counter_going_up_is_evidence(tmp_path):
    witness = _fake_proc(tmp_path, 77, "oom 0\noom_kill 0\n")
    baseline = witness.baseline(77)
    assert witness.evidence(77, baseline) == ""  # a SIGKILL from someone else
    (tmp_path / "cg" / "w" / "memory.events").write_text("oom 1\noom_kill 1\n")
    assert witness.evidence(77, baseline) == f"{tmp_path}/cg/w/memory.events: oom_kill 0 -> 1"
    witness.close()


def test_the_kernel_log_wins_over_the_cgroup(tmp_path):
    witness = _fake_proc(tmp_path, 31485, "oom_kill 5\n")
    (tmp_path / "no-kmsg").write_text("")
    baseline = witness.baseline(31485)
    with open(tmp_path / "no-kmsg", "a") as f:
        f.write(KMSG_KILLED + "\n")
    (tmp_path / "cg" / "w" / "memory.events").write_text("oom_kill 6\n")
    assert witness.evidence(31485, baseline).startswith("kernel log: Memory cgroup out of memory: Killed process 31485")
    witness.close()


def test_exit_info_says_oom_killer_not_just_sigkill():
    info = ExitInfo(-9, oom="kernel log: Out of memory: Killed process 4242 (dp0-pp0-tp1)")
    assert info.short == "SIGKILL (OOM killer)"
    assert info.reason == ("SIGKILL (killed by the kernel's OOM killer: kernel log: Out of memory: Killed process 4242 "
                           "(dp0-pp0-tp1))")
    assert "OOM killer" in info.meaning and "4242" in info.meaning
    plain = ExitInfo(-9)
    assert plain.short == "SIGKILL" and "OOM killer:" not in plain.reason


def test_exit_info_of_a_device_error_names_the_cause():
    info = ExitInfo(73, cause="AcceleratorError: CUDA error: an illegal memory access was encountered")
    assert info.short == "exit 73"
    assert info.reason.startswith("exit code 73 (a fatal device error")
    assert info.reason.endswith("; AcceleratorError: CUDA error: an illegal memory access was encountered)")
    assert os.linesep not in info.reason
