"""What crash safety costs: throughput with and without a recovery store, and time to recover.

    python -m sferp.benchmarks.recovery [--orders 43500] [--repeat 2] [--interval 5]

Everything runs against the embedded broker with one generated stream (43,500
orders is about 500,000 events), each run as its own `sferp run` process:

1. `--until-caught-up` without and with `--recovery-dir` (alternating, `--repeat`
   times each): events/s over the whole run (start-up included) and over the
   processing alone (first commit to exit), and the CPU seconds of the process.
2. A live flow with recovery is killed with SIGKILL once it has caught up, and
   restarted: the time from the restart to caught up again (every message
   counted in flow_stats), i.e. start-up, resume, rollback and replay.
3. The same with the kill at half the stream: the time from the restart until
   the whole stream is consumed.
"""

from __future__ import annotations

import argparse
import http.client
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson
from sferp.connectors.query_server import TOKEN_HEADER, endpoint_path

from sferp.broker import EmbeddedBroker
from sferp.generator import GeneratorConfig, produce

ROLES = ("sf_cdc", "erp_items", "erp_inventory", "erp_sales_orders")
OUTPUTS = ("out_inventory", "out_orders", "out_exceptions", "dlq")


def live_consumed(views: Path, pid: int) -> int | None:
    """sum(flow_stats.consumed) as the running writer `pid` serves it; None when not serving.

    Asks the writer's query endpoint only, never opens the file (a read-only open
    would hold a lock a starting writer needs).
    """
    try:
        info = orjson.loads(Path(endpoint_path(str(views))).read_bytes())
        if int(info["pid"]) != pid:
            return None
        conn = http.client.HTTPConnection("127.0.0.1", int(info["port"]), timeout=10)
        try:
            body = {"sql": "SELECT sum(consumed) FROM flow_stats", "max_rows": 1, "timeout_s": 5}
            conn.request(
                "POST",
                "/query",
                body=orjson.dumps(body),
                headers={"Content-Type": "application/json", TOKEN_HEADER: str(info["token"])},
            )
            resp = conn.getresponse()
            data = orjson.loads(resp.read())
        finally:
            conn.close()
    except (OSError, ValueError, KeyError, http.client.HTTPException):
        return None
    return int(data["rows"][0][0] or 0) if resp.status == 200 else None


def _tail(workdir: Path) -> str:
    logs = sorted(workdir.glob("run*.log"))
    return logs[-1].read_text()[-2000:] if logs else "(no log)"


class _Bench:
    def __init__(self, bootstrap: str, config: Path, root: Path, interval: float) -> None:
        self.bootstrap = bootstrap
        self.config = config
        self.root = root
        self.env = dict(
            os.environ, SFERP_FLOW__SNAPSHOT_INTERVAL_S=str(interval), SFERP_METRICS__PORT="0"
        )
        self.n = 0

    def spawn(self, workdir: Path, *, recovery: bool, bounded: bool) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "sferp", "run", "--config", str(self.config)]
        cmd += ["--bootstrap", self.bootstrap, "--views", str(workdir / "views.duckdb")]
        if recovery:
            cmd += ["--recovery-dir", str(workdir / "recovery")]
        if bounded:
            cmd.append("--until-caught-up")
        self.n += 1
        log = open(workdir / f"run{self.n}.log", "w")  # noqa: SIM115 - inherited by the child
        try:
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        finally:
            log.close()

    def fresh(self, label: str) -> Path:
        workdir = self.root / f"{label}-{self.n}"
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        return workdir

    def bounded_run(self, recovery: bool) -> dict[str, float]:
        workdir = self.fresh("rec" if recovery else "plain")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        proc = self.spawn(workdir, recovery=recovery, bounded=True)
        first = None
        while proc.poll() is None:
            if first is None and (live_consumed(workdir / "views.duckdb", proc.pid) or 0) > 0:
                first = time.monotonic()
            time.sleep(0.02)
        end = time.monotonic()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise SystemExit(f"run failed:\n{_tail(workdir)}")
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return {"wall": end - t0, "processing": end - (first or t0), "cpu": cpu}

    def kill_and_recover(self, total: int, kill_fraction: float) -> dict[str, float]:
        """Kill a live flow at `kill_fraction` of the stream; time the restart to caught up."""
        workdir = self.fresh("kill")
        views = workdir / "views.duckdb"
        proc = self.spawn(workdir, recovery=True, bounded=False)
        while (live_consumed(views, proc.pid) or 0) < kill_fraction * total:
            if proc.poll() is not None:
                raise SystemExit(f"run ended early:\n{_tail(workdir)}")
            time.sleep(0.02)
        if kill_fraction >= 1:
            time.sleep(2.0)  # idle and caught up: at least one snapshot since
        at_kill = live_consumed(views, proc.pid) or 0
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        t0 = time.monotonic()
        proc = self.spawn(workdir, recovery=True, bounded=False)
        try:
            answered = None
            while True:
                n = live_consumed(views, proc.pid)
                if n is not None and answered is None:
                    answered = time.monotonic()
                if n is not None and n >= total:
                    break
                if proc.poll() is not None:
                    raise SystemExit(f"restart failed:\n{_tail(workdir)}")
                time.sleep(0.02)
            done = time.monotonic()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        return {
            "killed_at": at_kill,
            "to_views_open": (answered or done) - t0,
            "to_caught_up": done - t0,
        }


def main(argv: list[str] | None = None) -> int:
    """Run the measurements and print them."""
    p = argparse.ArgumentParser(prog="python -m sferp.benchmarks.recovery", description=__doc__)
    p.add_argument("--orders", type=int, default=43_500)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--interval", type=float, default=5.0, help="snapshot interval (s)")
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="sferp-recovery-bench-"))
    try:
        with EmbeddedBroker() as broker:
            suffix = uuid.uuid4().hex[:8]
            names = {role: f"{role}.{suffix}" for role in ROLES + OUTPUTS}
            broker.create_topics(
                {names[r]: 3 for r in ROLES} | {names[r]: 1 for r in OUTPUTS}, timeout_s=30
            )
            cfg = GeneratorConfig(
                orders=args.orders,
                partitions=3,
                seed=args.seed,
                topics={r: names[r] for r in ROLES},
            )
            total = sum(produce(cfg, broker.bootstrap, create_topics=False).values())
            config = root / "sferp.toml"
            config.write_text("[topics]\n" + "".join(f'{r} = "{n}"\n' for r, n in names.items()))
            bench = _Bench(broker.bootstrap, config, root, args.interval)
            print(
                f"stream: {total:,} events ({args.orders:,} orders); "
                f"snapshot interval {args.interval:g} s; {os.cpu_count()} CPUs"
            )
            results: dict[bool, list[dict[str, float]]] = {False: [], True: []}
            for _ in range(args.repeat):
                for recovery in (False, True):
                    r = bench.bounded_run(recovery)
                    results[recovery].append(r)
                    print(
                        f"  {'with' if recovery else 'without'} recovery: "
                        f"{total / r['wall']:,.0f} events/s ({r['wall']:.1f} s incl. start-up), "
                        f"{total / r['processing']:,.0f} events/s processing, "
                        f"{r['cpu']:.1f} CPU s",
                        flush=True,
                    )
            for recovery in (False, True):
                best = max(total / r["processing"] for r in results[recovery])
                cpu = min(r["cpu"] for r in results[recovery])
                print(
                    f"best {'with' if recovery else 'without'} recovery: "
                    f"{best:,.0f} events/s processing, {cpu:.1f} CPU s"
                )
            for fraction in (1.0, 0.5):
                k = bench.kill_and_recover(total, fraction)
                what = "after catching up" if fraction >= 1 else "at half the stream"
                print(
                    f"kill -9 {what} ({int(k['killed_at']):,} consumed): views served again "
                    f"{k['to_views_open']:.1f} s after the restart, caught up after "
                    f"{k['to_caught_up']:.1f} s",
                    flush=True,
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
