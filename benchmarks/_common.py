"""Helpers shared by the stage benchmarks: isolated child runs, memory readings, table and JSON output.

Each side of a comparison (our stage, its anchor) runs in its own freshly spawned Python process, so
that its peak RSS is its own (``ru_maxrss`` is a high-water mark: a second run in the same process
would inherit the first one's peak) and neither side profits from the other's warm caches or imports.
Timings are never asserted: shared machines drift, which is why only the ratio is meaningful.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def rss_mb() -> float:
    """Current resident set size of this process in MiB."""
    with open("/proc/self/statm") as stats:
        pages = int(stats.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident set size in MiB: this process's (VmHWM), or its largest waited-for descendant's.

    Not ``ru_maxrss`` for this process: Linux keeps that high-water mark across ``execve``, so a
    child spawned by a large parent would report the parent's peak. VmHWM belongs to the address
    space, which ``execve`` replaces.
    """
    if who == resource.RUSAGE_SELF:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def reset_peak_rss() -> None:
    """Lower this process's VmHWM to its current RSS (Linux ``clear_refs`` 5), so that a later
    ``peak_rss_mb()`` measures only what ran in between, whatever ran before in this process."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _child_entry(target: Callable[..., dict], kwargs: dict, conn: Any, log_path: str | None) -> None:
    if log_path is not None:  # also catches the output of processes this child starts (they inherit fds)
        sys.stdout.flush()
        sys.stderr.flush()
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
    try:
        result = target(**kwargs)
        result["peak_rss_self_mb"] = peak_rss_mb(resource.RUSAGE_SELF)
        result["peak_rss_children_mb"] = peak_rss_mb(resource.RUSAGE_CHILDREN)
        conn.send(("ok", result))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class TreeMemory:
    """Peak memory (VmHWM) of a process and of every process it starts, polled while they live:
    a run's driver and each of its workers, whatever started them (Beam, dask, img2dataset)."""

    def __init__(self, pid: int, interval_s: float = 0.2):
        import threading

        self.pid = pid
        self.interval_s = interval_s
        self.peaks: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        import psutil

        while not self._stop.wait(self.interval_s):
            try:
                root = psutil.Process(self.pid)
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for process in tree:
                try:
                    with open(f"/proc/{process.pid}/status") as status:
                        peak = next(
                            int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:")
                        )
                    label = " ".join(process.cmdline()[1:4])[:80]
                except (OSError, StopIteration, psutil.Error):
                    continue
                self.peaks[process.pid] = (label, max(peak, self.peaks.get(process.pid, ("", 0.0))[1]))

    def stop(self) -> dict:
        """{"driver_mb": the process's own peak, "workers_mb": the peaks of what it started, largest first}."""
        self._stop.set()
        self._thread.join()
        driver = self.peaks.pop(self.pid, ("", 0.0))[1]
        workers = sorted((round(peak, 1) for _, peak in self.peaks.values()), reverse=True)
        return {"driver_mb": round(driver, 1), "workers_mb": workers}


def run_isolated(
    target: Callable[..., dict], log_path: Path | None = None, watch_tree: bool = False, **kwargs: Any
) -> dict:
    """Run ``target(**kwargs)`` in a fresh spawned (non-daemonic) process and return its result dict.

    ``target`` must be a module-level function. Non-daemonic so that img2dataset may start its own
    process pool inside it. ``log_path``: where the child's stdout and stderr go (default: inherited).
    ``watch_tree``: add ``memory``, the peaks of the child and of every process it starts (``TreeMemory``).
    """
    ctx = multiprocessing.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    process = ctx.Process(
        target=_child_entry,
        args=(target, kwargs, child_conn, None if log_path is None else str(log_path)),
        daemon=False,
    )
    started = time.perf_counter()
    process.start()
    watch = TreeMemory(process.pid) if watch_tree else None
    child_conn.close()
    try:
        status, payload = parent_conn.recv()
    except EOFError:
        process.join()
        raise RuntimeError(
            f"{target.__name__} died without a result (exit code {process.exitcode})"
        ) from None
    process.join()
    if watch is not None and status == "ok":
        payload["memory"] = watch.stop()
    if status != "ok":
        log = ""
        if log_path is not None and Path(log_path).is_file():
            log = "\n--- child log (tail) ---\n" + Path(log_path).read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{target.__name__} failed in its child process:\n{payload}{log}")
    payload["process_wall_s"] = time.perf_counter() - started
    return payload


def machine_info() -> dict:
    return {
        "cpus": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
    }


def median_run(runs: Sequence[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.2f}"
        return str(value)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "  ".join(
        h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True))
    )
    print(line)
    print("-" * len(line))
    for row in cells:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )


def write_result(out: Path, name: str, result: dict) -> Path:
    """Write ``<out>/<name>.json`` (``out`` may also be a path ending in .json)."""
    out = Path(out)
    path = out if out.suffix == ".json" else out / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": name, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **result}
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return path


def profile_text(profiler: Any, limit: int = 35) -> str:
    """The ``limit`` entries of a cProfile.Profile with the most cumulative time, as text."""
    import io
    import pstats

    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats("cumulative").print_stats(limit)
    stats.sort_stats("tottime").print_stats(limit // 2)
    return stream.getvalue()
