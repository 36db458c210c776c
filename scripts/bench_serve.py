#!/usr/bin/env python
"""Serving under fire: no lost requests while ranks die, on SIGTERM, and through a rolling restart (issue 17).

Everything runs in this process through the Supervisor API: dp=2 tp=2 ``workload=llm`` (the tiny preset, float32 on
CPU), one_for_one with a restart budget that never runs out. A request is one greedy generation (batch 2, prompts of
8 and 12 tokens, --tokens new tokens) through supervisor/serving.py's Generator: one request per dp group at a time,
continued on another group (prefill of prompt + tokens so far) when its group dies. Every answer is compared with the
single-process reference (worker/llm/engine.py's local_engine on the same checkpoint).

    (a) chaos: --clients client threads send requests back to back for 2 x --seconds while a random rank of a random
        group is SIGKILLed every --kill-every seconds. Retries on and off are interleaved, A B A B, one kill window
        each, so both see the same machine: a request runs in the mode of the window it started in. Per mode:
        requests sent / answered / failed / wrong, latency p50/p99 of requests that overlapped a recovery window
        (kill -> its group serving again) and of those that did not, and the kill -> serving-again times.
    (b) rolling restart under load: --rolls rolling restarts (SIGUSR2's path, Supervisor.rolling_restart()) while
        the clients run: failed requests, seconds per group.
    (c) SIGTERM under load: the CLI's own signal handler (supervisor.signals.SignalState) installed here, then
        SIGTERM to this process: requests in flight at that instant completed vs failed within shutdown.drain_s,
        new requests refused (ShutdownInProgress), time from SIGTERM to every worker stopped.

    python scripts/bench_serve.py                 # the note's run: 180 s per mode (6 min of chaos) + (b) + (c)
    python scripts/bench_serve.py --seconds 20    # a quick look

Progress goes to stderr; the tables are printed last, on stdout, with the load average of the (shared) machine.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_common as C  # noqa: E402  (also puts the repository root on sys.path)

from worker.llm.shape import preset  # noqa: E402

PROMPT_LENS = (8, 12)  # one batch: two rows of different lengths (left padding is exercised)
PROMPT_SETS = 8  # distinct requests, cycled
REQUEST_TIMEOUT_S = 120.0
RECOVERY_TIMEOUT_S = 60.0
NEVER_GIVE_UP = ("restart.intensity=100000", "restart.period_s=1")


def tree_overrides(args) -> list[str]:
    return ["workload=llm", "parallel.dp=2", "parallel.tp=2", "restart=one_for_one", *NEVER_GIVE_UP,
            f"llm.max_new_tokens={args.tokens}", f"llm.batch={len(PROMPT_LENS)}", f"llm.seed={args.seed}",
            f"shutdown.drain_s={args.drain_s}"]


# ---------------------------------------------------------------------------------------------------------------
# requests and their reference answers
def prompt_sets(vocab: int, seed: int) -> list[list[list[int]]]:
    rng = random.Random(seed)
    return [[[rng.randrange(1, vocab) for _ in range(n)] for n in PROMPT_LENS] for _ in range(PROMPT_SETS)]


def reference_answers(sup, prompts: list, tokens: int) -> list:
    """The single-process answers: the whole model in this process (tp = pp = 1), same checkpoint, float32."""
    from worker.llm.engine import generate, local_engine

    p = sup.cfg.parallel
    info = sup.collective_rpc("model_info", timeout=60, unique_reply_rank=(p.pp - 1) * p.tp)
    engine = local_engine(info["checkpoint"], dtype="float32", batch=len(PROMPT_LENS),
                          max_seq=max(PROMPT_LENS) + tokens)
    return [generate(engine, ps, tokens) for ps in prompts]


@dataclass
class Outcome:
    mode: str
    t0: float
    t1: float
    result: str  # ok | wrong | refused | failed: <type>
    detail: str = ""  # the error's first line, for failures


@dataclass
class Clients:
    """Client threads sending requests back to back; the mode of each request is chosen by ``mode_of(t0)``."""

    gens: dict[str, Any]
    prompts: list
    answers: list
    tokens: int
    n: int
    mode_of: Any = None
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: list[Outcome] = field(default_factory=list)
    inflight: dict[int, tuple[str, float]] = field(default_factory=dict)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> "Clients":
        self.threads = [threading.Thread(target=self._run, args=(c,), daemon=True) for c in range(self.n)]
        for t in self.threads:
            t.start()
        return self

    def _run(self, c: int) -> None:
        from supervisor.errors import ShutdownInProgress

        k = c
        while not self.stop.is_set():
            mode = self.mode_of(time.time()) if self.mode_of else "retry"
            i = k % len(self.prompts)
            t0 = time.time()
            with self.lock:
                self.inflight[c] = (mode, t0)
            detail = ""
            try:
                out = self.gens[mode].generate(self.prompts[i], self.tokens, timeout=REQUEST_TIMEOUT_S)
                result = "ok" if out == self.answers[i] else "wrong"
            except ShutdownInProgress:
                result = "refused"
            except Exception as exc:  # noqa: BLE001 -- every failure is a finding
                result, detail = f"failed: {type(exc).__name__}", str(exc).splitlines()[0][:160]
            with self.lock:
                self.inflight.pop(c, None)
                self.done.append(Outcome(mode, t0, time.time(), result, detail))
            if result == "refused":
                return
            k += self.n

    def join(self, timeout: float = 60) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout)


# ---------------------------------------------------------------------------------------------------------------
# (a) chaos
class Killer(threading.Thread):
    """Every ``every`` seconds: SIGKILL a random rank of a random serving group at a random instant of the window,
    then time until that group serves again. Windows are numbered from ``t_start``."""

    def __init__(self, sup, t_start: float, every: float, seconds: float, rng: random.Random) -> None:
        super().__init__(name="killer", daemon=True)
        self.sup, self.t_start, self.every, self.seconds, self.rng = sup, t_start, every, seconds, rng
        self.windows: list[tuple[float, float, int]] = []  # (kill time, serving again, group)
        self.stop = threading.Event()

    def run(self) -> None:
        k = 0
        while not self.stop.is_set() and (k + 1) * self.every <= self.seconds:
            at = self.t_start + k * self.every + self.rng.uniform(0.2, 0.5) * self.every
            if self.stop.wait(max(0.0, at - time.time())):
                return
            self._kill_one()
            k += 1

    def _kill_one(self) -> None:
        views = [g for g in self.sup.groups() if g.serving and g.pids]
        if not views:
            return
        g = self.rng.choice(views)
        pid = self.rng.choice(g.pids)
        t = time.time()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        C.wait_until(lambda: not self.sup.serving(g.index), 10, 0.001)
        self.sup.wait_until_serving(g.index, timeout=RECOVERY_TIMEOUT_S)
        self.windows.append((t, time.time(), g.index))


def run_chaos(args, rng: random.Random) -> tuple[list[Outcome], list, dict]:
    from supervisor.api import Supervisor
    from supervisor.serving import Generator

    sup = Supervisor(C.supervisor_config(*tree_overrides(args)))
    try:
        prompts = prompt_sets(preset("tiny").vocab_size, args.seed)
        answers = reference_answers(sup, prompts, args.tokens)
        on = Generator(sup, retry=True)
        off = Generator(sup, retry=False)
        off.leases = on.leases  # one request per group, whatever its mode
        total = 2 * args.seconds
        t_start = time.time()
        every = args.kill_every

        def mode_of(t: float) -> str:
            return "retry" if int((t - t_start) // every) % 2 == 0 else "no retry"

        clients = Clients({"retry": on, "no retry": off}, prompts, answers, args.tokens, args.clients, mode_of).start()
        killer = Killer(sup, t_start, every, total, rng)
        killer.start()
        while time.time() < t_start + total:
            time.sleep(min(10.0, max(0.0, t_start + total - time.time())))
            C.log(f"chaos: {time.time() - t_start:.0f}/{total:.0f} s, {len(clients.done)} requests, "
                  f"{len(killer.windows)} kills, load {os.getloadavg()[0]:.2f}")
        killer.stop.set()
        clients.join()
        killer.join(RECOVERY_TIMEOUT_S)
        retries = sup.events.of_kind("retry")
        return clients.done, killer.windows, {"retries": len(retries),
                                              "tokens_kept": sum(e.get("tokens_done", 0) for e in retries)}
    finally:
        sup.shutdown()


def chaos_rows(done: list[Outcome], windows: list) -> list[list[str]]:
    spans = [(t, back) for t, back, _ in windows]

    def inside(o: Outcome) -> bool:
        return any(o.t0 <= back and o.t1 >= t for t, back in spans)

    rows = []
    for mode in ("retry", "no retry"):
        mine = [o for o in done if o.mode == mode]
        ok = [o for o in mine if o.result == "ok"]
        lat_in = [o.t1 - o.t0 for o in ok if inside(o)]
        lat_out = [o.t1 - o.t0 for o in ok if not inside(o)]
        failed = [o for o in mine if o.result.startswith("failed")]
        rows.append([mode, len(mine), len(ok), len(failed), sum(o.result == "wrong" for o in mine),
                     f"{len(lat_in)}", C.f_ms(C.median(lat_in), 0), C.f_ms(C.pct(lat_in, .99), 0),
                     f"{len(lat_out)}", C.f_ms(C.median(lat_out), 0), C.f_ms(C.pct(lat_out, .99), 0)])
    return rows


def failure_notes(done: list[Outcome]) -> list[str]:
    """Why requests failed, per mode: each distinct reason with its count (rank and pid numbers folded)."""
    import re
    from collections import Counter

    reasons = Counter((o.mode, o.result, re.sub(r"\d+", "N", o.detail)) for o in done if o.result.startswith("failed"))
    return [f"{mode} {result} x{n}: {detail}" for (mode, result, detail), n in reasons.most_common(6)]


# ---------------------------------------------------------------------------------------------------------------
# (b) rolling restart and (c) SIGTERM, on one tree
def run_roll_and_term(args) -> tuple[list[dict], list[Outcome], dict]:
    from supervisor import signals as cli_signals
    from supervisor.api import Supervisor
    from supervisor.serving import Generator

    sup = Supervisor(C.supervisor_config(*tree_overrides(args)))
    ours = (*cli_signals.GRACEFUL, cli_signals.FORCED, cli_signals.DUMP_STACKS, cli_signals.ROLLING_RESTART)
    old = {s: signal.getsignal(s) for s in ours}
    try:
        prompts = prompt_sets(preset("tiny").vocab_size, args.seed)
        answers = reference_answers(sup, prompts, args.tokens)
        clients = Clients({"retry": Generator(sup)}, prompts, answers, args.tokens, args.clients).start()
        time.sleep(args.settle_s)
        rolls = []
        for r in range(args.rolls):
            n0 = len(clients.done)
            t0 = time.time()
            seconds = sup.rolling_restart(timeout=RECOVERY_TIMEOUT_S * 2)
            t1 = time.time()
            time.sleep(args.settle_s)
            during = [o for o in clients.done[n0:] if o.t0 <= t1]
            rolls.append({"round": r, "seconds": seconds, "wall": t1 - t0, "requests": len(during),
                          "failed": sum(o.result != "ok" for o in during)})
            C.log(f"rolling restart {r}: {seconds} ({rolls[-1]['failed']} of {len(during)} requests not ok)")
        handler = cli_signals.SignalState()
        handler.install()
        handler.attach(sup)
        with clients.lock:
            at_term = dict(clients.inflight)
            n_before = len(clients.done)
        t_term = time.time()
        os.kill(os.getpid(), signal.SIGTERM)  # the CLI's handler: request_shutdown(drain=True)
        sup.finished.wait(args.drain_s + 30)
        t_exit = time.time()
        clients.join()
        after = clients.done[n_before:]
        inflight = [o for o in after if (o.mode, o.t0) in set(at_term.values())]
        term = {"in_flight": len(at_term), "completed": sum(o.result == "ok" for o in inflight),
                "failed": sum(o.result != "ok" for o in inflight),
                "refused": sum(o.result == "refused" for o in after if o not in inflight),
                "exit_s": t_exit - t_term, "drained": sup.events.of_kind("drained")}
        return rolls, clients.done, term
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        sup.shutdown()


# ---------------------------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=180.0, help="chaos seconds per mode (retry on / off)")
    ap.add_argument("--kill-every", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    ap.add_argument("--rolls", type=int, default=3, help="rolling restarts under load")
    ap.add_argument("--drain-s", type=float, default=10.0)
    ap.add_argument("--settle-s", type=float, default=3.0, help="steady load before and between (b) and (c)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    load0 = os.getloadavg()
    tmp = C.TempDir("bench-serve-")
    try:
        C.log(f"(a) chaos: 2 x {args.seconds:.0f} s, a kill every {args.kill_every:.0f} s")
        done, windows, stats = run_chaos(args, rng)
        C.log("(b) rolling restarts and (c) SIGTERM under load")
        rolls, roll_done, term = run_roll_and_term(args)
    finally:
        C.cleanup(tmp)
    load1 = os.getloadavg()
    recover = [back - t for t, back, _ in windows]
    print(C.format_table(
        f"(a) dp=2 tp=2 workload=llm (tiny, fp32, CPU), {args.clients} clients, a rank SIGKILLed every "
        f"{args.kill_every:.0f} s; retry on / off interleaved A B A B ({args.seconds:.0f} s each)",
        ["mode", "sent", "answered ok", "failed", "wrong", "n in recov.", "p50 in", "p99 in", "n outside",
         "p50 out", "p99 out"], chaos_rows(done, windows),
        [f"'wrong' = an answer that differs from the single-process reference; 'in recov.' = the request overlapped "
         f"a kill -> serving-again window",
         f"{len(windows)} kills; kill -> group serving again: median {C.f_ms(C.median(recover), 0)}, p99 "
         f"{C.f_ms(C.pct(recover, .99), 0)}; {stats['retries']} requests continued on another group (or the next "
         f"incarnation), {stats['tokens_kept']} tokens kept instead of regenerated",
         *failure_notes(done)]))
    print()
    per_group = [s for r in rolls for s in r["seconds"].values()]
    print(C.format_table(
        f"(b) rolling restart under load ({args.rolls} rounds of dp=2, one group at a time)",
        ["round", "group 0", "group 1", "whole roll", "requests during", "failed"],
        [[r["round"], C.f_s(r["seconds"].get(0, float("nan"))), C.f_s(r["seconds"].get(1, float("nan"))),
          C.f_s(r["wall"]), r["requests"], r["failed"]] for r in rolls],
        [f"per group (requests on it finished, gate closed -> serving again): median {C.f_s(C.median(per_group))}",
         *failure_notes(roll_done)]))
    print()
    drained = term["drained"][0] if term["drained"] else {}
    print(C.format_table(
        f"(c) SIGTERM under load (CLI handler, shutdown.drain_s={args.drain_s:g})",
        ["in flight at SIGTERM", "completed", "failed", "new requests refused", "drain", "SIGTERM -> stopped"],
        [[term["in_flight"], term["completed"], term["failed"], term["refused"],
          C.f_s(drained.get("seconds", float("nan"))), C.f_s(term["exit_s"])]]))
    print(f"\nload average (1 min) at start {load0[0]:.2f}, at end {load1[0]:.2f} on {os.cpu_count()} CPUs "
          "(a machine shared with other work)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
