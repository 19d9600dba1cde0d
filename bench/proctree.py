"""Run a command and measure it from outside: wall time, and the peak memory of every process in
its tree (the command and all its descendants, e.g. Ray's gcs_server, raylet and workers).

RSS counts file-backed pages too: a process that reads safetensors through mmap (mergekit, the
io floor) shows the touched parts of its input files as RSS, although the kernel can drop those
pages at any time. ``RssAnon`` (from /proc/PID/status) is the memory the process really owns,
so both are recorded. Shared pages (torch's libraries, Ray's object store) count once per
process, which is why the sum of per-process peaks is an upper bound, not a measurement.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

POLL_INTERVAL_S = 0.05
# After the command exits, how long its descendants get to exit on their own before they count
# as lingering (and are stopped): Ray's shutdown stops its daemons asynchronously.
LINGER_GRACE_S = 15.0


@dataclass
class ProcessPeak:
    pid: int
    role: str  # driver | worker | ray-daemon | other
    cmdline: str
    rss: int = 0
    anon: int = 0
    cpu_s: float = 0.0
    first_seen_s: float = 0.0
    last_seen_s: float = 0.0


@dataclass
class TreeRun:
    """The measurements of one command run."""

    argv: list[str]
    returncode: int
    wall_s: float
    tree_exit_s: float  # until the last descendant was gone (or stopped as lingering)
    processes: list[ProcessPeak]
    peak_total_rss: int  # max over samples of the tree's summed RSS
    peak_total_anon: int
    samples: int
    lingering: list[str] = field(default_factory=list)
    timed_out: bool = False
    log: str = ""

    def by_role(self, role: str) -> list[ProcessPeak]:
        return [p for p in self.processes if p.role == role]

    @property
    def driver(self) -> ProcessPeak:
        return self.by_role("driver")[0]

    @property
    def largest_worker(self) -> ProcessPeak | None:
        workers = self.by_role("worker")
        return max(workers, key=lambda p: p.rss) if workers else None

    @property
    def sum_of_peaks_rss(self) -> int:
        return sum(p.rss for p in self.processes)

    @property
    def sum_of_peaks_anon(self) -> int:
        return sum(p.anon for p in self.processes)

    @property
    def cpu_s(self) -> float:
        return sum(p.cpu_s for p in self.processes)

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        worker = self.largest_worker
        data["summary"] = {
            "driver_rss": self.driver.rss,
            "driver_anon": self.driver.anon,
            "largest_worker_rss": worker.rss if worker else None,
            "largest_worker_anon": worker.anon if worker else None,
            "workers": len(self.by_role("worker")),
            "sum_of_peaks_rss": self.sum_of_peaks_rss,
            "sum_of_peaks_anon": self.sum_of_peaks_anon,
            "peak_total_rss": self.peak_total_rss,
            "peak_total_anon": self.peak_total_anon,
            "cpu_s": self.cpu_s,
        }
        return data


def _memory(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) in bytes from /proc/PID/status: one cheap read per process."""
    rss = anon = 0
    with open(f"/proc/{pid}/status", "rb") as status:
        for line in status:
            if line.startswith(b"VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith(b"RssAnon:"):
                anon = int(line.split()[1]) * 1024
    return rss, anon


def _role(process: psutil.Process, root_pid: int) -> str:
    """driver (the command itself), worker (a Ray worker process), ray-daemon, or other."""
    if process.pid == root_pid:
        return "driver"
    try:
        argv = process.cmdline()
    except psutil.Error:
        return "other"
    if not argv:
        return "other"  # not readable yet: classified again at the next sample
    if argv[0].startswith("ray::"):  # a Ray process retitled by setproctitle: worker or agent
        return "ray-daemon" if argv[0].endswith("Agent") else "worker"
    # The raylet's own command line names default_worker.py too (as its worker command): look
    # only at the interpreter's script arguments.
    if any(arg.endswith(("default_worker.py", "setup_worker.py")) for arg in argv[1:4]):
        return "worker"
    if any("/ray/" in arg for arg in argv[:3]):
        return "ray-daemon"
    return "other"


class TreeMonitor:
    """Polls the process tree under ``root`` every ``interval`` seconds in a thread."""

    def __init__(self, root: int, started: float, interval: float = POLL_INTERVAL_S) -> None:
        self.root = root
        self.started = started
        self.interval = interval
        self.peaks: dict[tuple[int, float], ProcessPeak] = {}
        self.known: dict[int, psutil.Process] = {}
        self.peak_total_rss = 0
        self.peak_total_anon = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tree-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def alive(self) -> list[psutil.Process]:
        """Known processes still running (descendants keep counting after being reparented)."""
        living = []
        for process in list(self.known.values()):
            try:
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    living.append(process)
            except psutil.Error:
                pass
        return living

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)
        self.sample()

    def sample(self) -> None:
        try:
            root = psutil.Process(self.root)
            found = [root, *root.children(recursive=True)]
        except psutil.Error:
            found = []
        for process in found:
            self.known.setdefault(process.pid, process)
        now = time.monotonic() - self.started
        total_rss = total_anon = 0
        for process in self.alive():
            try:
                rss, anon = _memory(process.pid)
                cpu = process.cpu_times()
                key = (process.pid, process.create_time())
            except (OSError, psutil.Error):
                continue
            peak = self.peaks.get(key)
            if peak is None:
                try:
                    cmdline = " ".join(process.cmdline())[:300]
                except psutil.Error:
                    cmdline = ""
                peak = self.peaks[key] = ProcessPeak(process.pid, _role(process, self.root), cmdline, first_seen_s=now)
            elif peak.role in ("other", "worker", "ray-daemon") and process.pid != self.root:
                # Workers retitle themselves "ray::..." after start; a cmdline may be unreadable
                # at first sight.
                peak.role = _role(process, self.root)
                if not peak.cmdline:
                    try:
                        peak.cmdline = " ".join(process.cmdline())[:300]
                    except psutil.Error:
                        pass
            peak.rss = max(peak.rss, rss)
            peak.anon = max(peak.anon, anon)
            peak.cpu_s = max(peak.cpu_s, cpu.user + cpu.system)
            peak.last_seen_s = now
            total_rss += rss
            total_anon += anon
        self.peak_total_rss = max(self.peak_total_rss, total_rss)
        self.peak_total_anon = max(self.peak_total_anon, total_anon)
        self.samples += 1


def _stop_processes(processes: Sequence[psutil.Process]) -> None:
    for process in processes:
        try:
            process.terminate()
        except psutil.Error:
            pass
    _, still = psutil.wait_procs(list(processes), timeout=5)
    for process in still:
        try:
            process.kill()
        except psutil.Error:
            pass


def run_measured(
    argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None,
    cwd: str | None = None, timeout_s: float = 3600.0, watch: Sequence[int] = (),
) -> TreeRun:
    """Run ``argv`` to completion (stdout and stderr to ``log_path``) under the tree monitor.

    ``watch``: roots of other process trees that work for the command while it runs (a Ray head
    started beforehand: its raylet spawns the command's workers); they are measured too, as
    ``ray-daemon`` and ``worker`` processes, and left running."""
    with open(log_path, "wb") as log:
        started = time.monotonic()
        process = subprocess.Popen(
            list(argv), stdout=log, stderr=subprocess.STDOUT, env=dict(env) if env else None, cwd=cwd,
            start_new_session=True,  # its own process group: a timeout stops the whole tree
        )
        monitor = TreeMonitor(process.pid, started)
        monitor.start()
        watchers = [TreeMonitor(root, started) for root in watch]
        for watcher in watchers:
            watcher.start()
        timed_out = threading.Event()

        def on_timeout() -> None:
            timed_out.set()
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout_s, on_timeout)
        timer.start()
        try:
            # (Not wait4's ru_maxrss for the driver: Linux carries the parent's RSS at fork into
            # the child's peak, across exec, so it would report the bench's own size.)
            process.wait()
        except BaseException:
            # Interrupted: take the whole tree down with us (its group, then any that left it).
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _stop_processes(monitor.alive())
            monitor.stop()
            raise
        finally:
            timer.cancel()
        wall = time.monotonic() - started

        deadline = time.monotonic() + LINGER_GRACE_S
        while monitor.alive() and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL_S)
        lingering = monitor.alive()
        described = []
        for proc in lingering:
            try:
                described.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
            except psutil.Error:
                described.append(str(proc.pid))
        if lingering:
            _stop_processes(lingering)
        tree_exit = time.monotonic() - started
        monitor.stop()
        for watcher in watchers:
            watcher.stop()

    watched = []
    for watcher in watchers:
        for peak in watcher.peaks.values():
            if peak.role == "driver":  # the watched tree's own root, not the command
                peak.role = "ray-daemon"
            watched.append(peak)
    peaks = sorted([*monitor.peaks.values(), *watched], key=lambda p: (p.role != "driver", p.first_seen_s))
    if not any(p.role == "driver" for p in peaks):  # exited before the first sample
        peaks.insert(0, ProcessPeak(process.pid, "driver", " ".join(argv)[:300]))
    return TreeRun(
        argv=list(argv), returncode=process.returncode, wall_s=wall, tree_exit_s=tree_exit,
        processes=peaks,
        # With watched trees: the sum of each tree's own peak, an upper bound of the whole.
        peak_total_rss=monitor.peak_total_rss + sum(w.peak_total_rss for w in watchers),
        peak_total_anon=monitor.peak_total_anon + sum(w.peak_total_anon for w in watchers),
        samples=monitor.samples, lingering=described,
        timed_out=timed_out.is_set(), log=str(log_path),
    )
