"""Where the cores go during a load, from the kernel's scheduler trace (`perf record` of sched_switch and
sched_waking; Linux, root or kernel.perf_event_paranoid <= 1).

Per load: each thread group's run time (the engine's threads, the engine loop's response and cancellation threads,
the stubs' other threads, tritonserver, the load generator, idle), how long the engine's threads were switched out
while runnable (another thread took the core), and how long they waited for a core while another one idled (a
wake-up placed on the busy core). These are CPU milliseconds, which a noisy shared host moves far less than tokens
per second: bench_serving --sched compares a served load with the in-process engine's this way.
"""
from __future__ import annotations

import re
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
IDLE = "idle"
ENGINE = "engine"
_SWITCH = re.compile(r"(\d+)/\d+\s+\[(\d+)\]\s+([\d.]+):\s+sched:sched_switch: prev_comm=(.*?) prev_pid=(\d+) "
                     r".*?prev_state=(\S+) ==> next_comm=(.*?) next_pid=(\d+)")
_WAKING = re.compile(r"\[(\d+)\]\s+([\d.]+):\s+sched:sched_waking: .*? pid=(\d+)")


@dataclass
class SchedSummary:
    seconds: float  # the window
    run_ms: dict[str, float] = field(default_factory=dict)  # by thread group, idle included
    preempted_ms: float = 0.0  # the engine's threads switched out while runnable
    preemptions: int = 0
    waits_beside_idle_ms: float = 0.0  # the engine's threads waiting for a core while another core idled
    others: dict[str, float] = field(default_factory=dict)  # "other" run time by thread name (the top ones)
    preempted_by: dict[str, int] = field(default_factory=dict)  # who took an engine thread's core: group -> times

    def row(self) -> dict:
        return {"seconds": round(self.seconds, 3), "run_ms": {k: round(v, 1) for k, v in sorted(self.run_ms.items())},
                "engine_preempted_ms": round(self.preempted_ms, 1), "engine_preemptions": self.preemptions,
                "engine_waits_beside_idle_ms": round(self.waits_beside_idle_ms, 1),
                "others_ms": {k: round(v, 1) for k, v in sorted(self.others.items(), key=lambda x: -x[1])[:5]},
                "preempted_by": dict(sorted(self.preempted_by.items(), key=lambda x: -x[1]))}


def median_row(summaries: list[SchedSummary]) -> dict:
    """Several loads' summaries as one row: each figure's median; the "other" names averaged, the top four."""
    rows = [s.row() for s in summaries]
    med = lambda values: round(statistics.median(values), 1)  # noqa: E731
    groups = {g for r in rows for g in r["run_ms"]}
    others: dict[str, float] = {}
    for s in summaries:
        for name, ms in s.others.items():
            others[name] = others.get(name, 0.0) + ms / len(summaries)
    takers = {g for r in rows for g in r["preempted_by"]}
    return {"seconds": round(statistics.median(r["seconds"] for r in rows), 3),
            "run_ms": {g: med(r["run_ms"].get(g, 0.0) for r in rows) for g in sorted(groups)},
            "engine_preempted_ms": med(r["engine_preempted_ms"] for r in rows),
            "engine_preemptions": round(statistics.median(r["engine_preemptions"] for r in rows)),
            "engine_waits_beside_idle_ms": med(r["engine_waits_beside_idle_ms"] for r in rows),
            "others_ms": {k: round(v, 1) for k, v in sorted(others.items(), key=lambda x: -x[1])[:4]},
            "preempted_by": dict(sorted(((g, round(statistics.median(r["preempted_by"].get(g, 0) for r in rows)))
                                         for g in takers), key=lambda x: -x[1]))}


def summarize(lines: Iterable[str], start: float, end: float, processes: dict[int, str],
              threads: dict[int, str]) -> SchedSummary:
    """`perf script -F pid,tid,time,cpu,event,trace` lines (CLOCK_MONOTONIC times) -> the window [start, end]'s
    summary. processes: process id -> group (threads that came and went during the load count too); threads:
    thread id -> group where a thread is told apart from its process ("engine" for the engine's). Tasks of
    other processes count as "other" (by thread name), pid 0 as idle."""
    engine = {tid for tid, group in threads.items() if group == ENGINE}
    out = SchedSummary(seconds=end - start)
    process_of: dict[int, int] = {}  # thread id -> its process, from the thread's own switches out
    takers: dict[tuple[int, str], int] = {}  # (thread id, name) that took an engine thread's core -> times
    running: dict[int, tuple[int, str, float]] = {}  # cpu -> (tid, name, since)
    waiting: dict[int, float] = {}  # engine tid -> runnable since (woken or preempted)
    preempted: set[int] = set()
    idle: dict[int, list[tuple[float, float]]] = {}  # cpu -> idle intervals
    waits: list[tuple[int, float, float]] = []  # (cpu it then ran on, from, to)

    def clip(a: float, b: float) -> float:
        return max(0.0, min(b, end) - max(a, start))

    def account(cpu: int, tid: int, name: str, a: float, b: float, process: int) -> None:
        group = IDLE if tid == 0 else threads.get(tid) or processes.get(process, "other")
        out.run_ms[group] = out.run_ms.get(group, 0.0) + clip(a, b) * 1e3
        if group == "other":
            out.others[name] = out.others.get(name, 0.0) + clip(a, b) * 1e3
        if tid == 0:
            idle.setdefault(cpu, []).append((a, b))

    for line in lines:
        m = _SWITCH.search(line)
        if m:
            process, cpu, t, prev, state, nxt = int(m[1]), int(m[2]), float(m[3]), int(m[5]), m[6], int(m[8])
            process_of[prev] = process
            since = running[cpu][2] if cpu in running else None
            if since is not None:  # the switch's own process is the outgoing task's
                account(cpu, prev, m[4], since, t, process)
            running[cpu] = (nxt, m[7], t)
            if prev in engine and state.startswith("R"):
                waiting[prev] = t
                preempted.add(prev)
                if start <= t <= end and nxt not in engine:
                    takers[nxt, m[7]] = takers.get((nxt, m[7]), 0) + 1
            if nxt in engine and nxt in waiting:
                since = waiting.pop(nxt)
                waits.append((cpu, since, t))
                if nxt in preempted:
                    preempted.discard(nxt)
                    out.preempted_ms += clip(since, t) * 1e3
                    out.preemptions += start <= t <= end
            continue
        m = _WAKING.search(line)
        if m and int(m[3]) in engine:
            waiting.setdefault(int(m[3]), float(m[2]))
    for (tid, name), times in takers.items():  # grouped once every thread's process is known
        taker = threads.get(tid) or processes.get(process_of.get(tid, -1), name)
        out.preempted_by[taker] = out.preempted_by.get(taker, 0) + times
    for cpu, (tid, name, since) in running.items():  # the tasks still on their cores at the trace's end
        account(cpu, tid, name, since, end, -1 if tid else 0)
    out.waits_beside_idle_ms = sum(_overlap(a, b, idle, cpu, start, end) for cpu, a, b in waits) * 1e3
    return out


def _overlap(a: float, b: float, idle: dict[int, list[tuple[float, float]]], cpu: int, start: float,
             end: float) -> float:
    """Seconds of [a, b] (inside the window) during which some core other than `cpu` idled."""
    a, b = max(a, start), min(b, end)
    spans = sorted((max(x, a), min(y, b)) for c, iv in idle.items() if c != cpu for x, y in iv if y > a and x < b)
    total, reach = 0.0, a
    for x, y in spans:  # the union of the other cores' idle spans
        if y > reach:
            total += y - max(x, reach)
            reach = y
    return total


def record(run: Callable[[], T], groups: Callable[[], tuple[dict[int, str], dict[int, str]]],
           window: Callable[[T], tuple[float, float] | None] | None = None) -> tuple[T, SchedSummary]:
    """Runs `run()` under `perf record`; returns its result and the summary of a window: window(result) (the
    load itself, in time.monotonic() seconds) or else the whole call. groups() is asked once the load is over:
    (process id -> group, thread id -> group). Raises RuntimeError where perf is missing or not allowed."""
    with tempfile.TemporaryDirectory() as folder:
        data = str(Path(folder) / "sched.data")
        cmd = ["perf", "record", "-q", "-e", "sched:sched_switch", "-e", "sched:sched_waking", "-k",
               "CLOCK_MONOTONIC", "-a", "-o", data]
        try:
            perf = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except FileNotFoundError:
            raise RuntimeError("perf is not installed") from None
        time.sleep(1.0)  # perf opens its events
        if perf.poll() is not None:
            raise RuntimeError(f"perf record failed: {perf.stderr.read().decode()[-300:]}")
        try:
            start = time.monotonic()
            result = run()
            end = time.monotonic()
            processes, threads = groups()
        finally:
            perf.send_signal(signal.SIGINT)
            perf.wait(60)
        text = subprocess.run(["perf", "script", "-i", data, "-F", "pid,tid,time,cpu,event,trace"],
                              capture_output=True, text=True, check=True).stdout
    start, end = (window and window(result)) or (start, end)
    return result, summarize(text.splitlines(), start, end, processes, threads)


THREADS = {"tgi-engine": ENGINE, "tgi-responses": "responses", "tgi-cancel": "cancellation"}  # the loop's threads


def server_groups(pids: Iterable[int]) -> tuple[dict[int, str], dict[int, str]]:
    """(process id -> group by process name, thread id -> group for the engine loop's named threads) for a
    server's process tree: the stubs' other threads (execute, IPC) stay "stub"."""
    names = {"tritonserver": "tritonserver", "triton_python_b": "stub"}
    processes: dict[int, str] = {}
    threads: dict[int, str] = {}
    for pid in pids:
        try:
            processes[pid] = names.get(Path(f"/proc/{pid}/comm").read_text().strip(), "launcher")
            tasks = list(Path(f"/proc/{pid}/task").glob("*"))
        except OSError:
            continue
        for task in tasks:
            try:
                group = THREADS.get((task / "comm").read_text().strip())
            except OSError:
                continue
            if group:
                threads[int(task.name)] = group
    return processes, threads


def markdown(rows: list[dict]) -> str:
    """bench_serving --sched's table: a row per model, streams and side."""
    groups = sorted({g for r in rows for g in r["run_ms"]} - {ENGINE, IDLE})
    head = ["model", "streams", "side", "tok/s", "load s", "engine ms", *groups, "idle", "engine preempted ms (times)",
            "engine waiting beside an idle core ms", "engine preempted by (times)", "other, by thread name"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ms = r["run_ms"]
        cells = [r["model"], r["concurrency"], r["side"], r["output_tok_s"], r["seconds"], ms.get(ENGINE, 0.0),
                 *(ms.get(g, 0.0) for g in groups), ms.get(IDLE, 0.0),
                 f"{r['engine_preempted_ms']} ({r['engine_preemptions']})", r["engine_waits_beside_idle_ms"],
                 ", ".join(f"{k} {v}" for k, v in r.get("preempted_by", {}).items()),
                 ", ".join(f"{k} {v}" for k, v in r.get("others_ms", {}).items())]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)
