"""Run one command and report its wall time, CPU time and peak RSS as JSON.

`python -m sferp.benchmarks.child --report FILE -- COMMAND...`

Why a helper: Linux counts the memory of the process that exec'd into a program
in that program's peak RSS (`ru_maxrss` keeps the high-water mark of the address
space replaced by exec, and a vfork'ed child borrows its parent's). Started
directly from the benchmark, whose memory holds a million generated messages,
every process would report at least the benchmark's own size. Started from this
small helper, a process's `ru_maxrss` is its own (plus this helper's few MiB at
most). SIGTERM and SIGINT are passed on to the command; the helper exits with
the command's exit code.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    """Run the command after `--`; write the report; return its exit code."""
    if len(argv) < 4 or argv[0] != "--report" or argv[2] != "--":
        print(
            "usage: python -m sferp.benchmarks.child --report FILE -- COMMAND...", file=sys.stderr
        )
        return 2
    report, cmd = argv[1], argv[3:]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd)

    def forward(signum: int, _frame: object) -> None:
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    while True:
        try:
            _, status, ru = os.wait4(proc.pid, 0)
            break
        except InterruptedError:
            continue
    wall = time.monotonic() - t0
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    result = {
        "returncode": code,
        "wall_s": wall,
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "peak_rss_bytes": ru.ru_maxrss * 1024,
    }
    tmp = report + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, report)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
