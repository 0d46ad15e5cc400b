"""`sferp bench` and `sferp plan`: throughput, latency and memory, measured beside baselines.

One run starts the embedded broker, generates the stream, pre-loads it, and
measures, each variant as its own subprocess against the same topics:

- the raw floor: kafka-python consume + orjson decode (`rawfloor.py`);
- a textbook Bytewax flow: decode, dedup and per-record merge with per-event
  `key_on`/`stateful_map` (`textbook.py`);
- sferp itself, `sferp run --until-caught-up`: 1 worker, `-w 2`, 2 processes
  (`-i 0/1 -a ...`), and 1 worker with a recovery store;
- end-to-end latency of a live flow at 50 % and 80 % of the 1-worker maximum
  (`latency.py`);
- peak RSS of every process, memory per live record, bytes per remembered
  de-duplication identity, snapshot size and cost (`memory.py`);
- the broker's CPU time and the CPU time other programs took beside every result.

The views of every bounded sferp run are compared with the reference model.
Results go to `benchmarks/results/<name>.json` with a Markdown report and PNG
charts (`report.py`); `sferp plan` turns a results file into a deployment size
(`plan.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from sferp.broker import EmbeddedBroker
from sferp.duckdb_connect import connect
from sferp.usage import int_between

from . import latency, memory, procs, report, workload
from .procs import Group, Measured

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCHEMA = 1


class _Usage(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _Usage(message)


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return v


def bench_parser() -> _Parser:
    """Arguments of `sferp bench`."""
    p = _Parser(prog="sferp bench", description="Throughput, latency and memory benchmarks.")
    p.add_argument("--quick", action="store_true", help="small smoke run (under a minute)")
    p.add_argument("--events", type=int_between(1), help="messages in the main stream (1,000,000)")
    p.add_argument("--partitions", type=int_between(1), default=3, help="partitions per topic")
    p.add_argument("--seed", type=int, default=42, help="generator seed")
    p.add_argument("--latency-seconds", type=_positive_float, help="length of each load phase (60)")
    p.add_argument(
        "--fill",
        help="live-record counts of the two memory runs, e.g. 100000,1000000",
    )
    p.add_argument("--repeat", type=int_between(1), default=1, help="runs per throughput variant")
    p.add_argument("--out", help=f"directory for results (default {RESULTS_DIR})")
    p.add_argument("--name", help="results file stem (default: a UTC timestamp)")
    p.add_argument("--workdir", help="keep views, logs and recovery stores here")
    return p


def cli_bench(argv: list[str]) -> int:
    """`sferp bench`: 0 when every variant ran and every view equals the reference model."""
    try:
        args = bench_parser().parse_args(argv)
        fill = _parse_fill(args.fill) if args.fill else None
    except _Usage as exc:
        print(f"sferp bench: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    quick = args.quick
    cfg = BenchConfig(
        quick=quick,
        events=args.events or (20_000 if quick else 1_000_000),
        partitions=args.partitions,
        seed=args.seed,
        latency_s=args.latency_seconds or (6.0 if quick else 60.0),
        fill=fill or ((5_000, 20_000) if quick else (100_000, 1_000_000)),
        repeat=args.repeat,
    )
    out = Path(args.out) if args.out else RESULTS_DIR
    name = args.name or datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="sferp-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        results = Bench(cfg, workdir).run()
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    paths = report.write_all(results, out, name)
    print(report.summary(results))
    for p in paths:
        print(f"wrote {p}")
    return 0 if results["complete"] else 1


def cli_plan(argv: list[str]) -> int:
    """`sferp plan --peak N`: workers and latency for a peak, from benchmark results."""
    from .plan import cli_plan as run

    return run(argv, RESULTS_DIR)


def _parse_fill(text: str) -> tuple[int, int]:
    try:
        a, b = (int(x.replace("_", "")) for x in text.split(","))
    except ValueError:
        raise _Usage(f"--fill: expected two counts like 100000,1000000, got {text!r}") from None
    if not 0 < a < b:
        raise _Usage(f"--fill: expected two increasing positive counts, got {text!r}")
    return a, b


class BenchConfig:
    """What one benchmark run measures."""

    def __init__(
        self,
        *,
        quick: bool,
        events: int,
        partitions: int,
        seed: int,
        latency_s: float,
        fill: tuple[int, int],
        repeat: int,
    ) -> None:
        """Store the knobs (validated by the command line)."""
        self.quick = quick
        self.events = events
        self.partitions = partitions
        self.seed = seed
        self.latency_s = latency_s
        self.fill = fill
        self.repeat = repeat
        self.duplicates = 0.05
        self.disorder = 0.20
        self.bad = 0.001
        self.batch_size = 8000  # flow.batch_size default
        self.latency_warmup_s = 1.0 if quick else 5.0
        self.latency_drain_s = 30.0
        self.latency_loads = (50, 80)  # percent of the 1-worker maximum
        self.samples_per_s = 20.0
        self.timeout_s = 600.0 if quick else 1800.0

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return dict(vars(self))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_ports(n: int) -> int:
    """A port p such that p .. p+n-1 are free now."""
    for _ in range(50):
        p = _free_port()
        if p + n > 65535:
            continue
        try:
            for k in range(1, n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p + k))
        except OSError:
            continue
        return p
    raise RuntimeError("no free port range for the metrics endpoints")


def _child_env() -> dict[str, str]:
    """The environment of measured processes: defaults only (no SFERP_* overrides)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SFERP_")}
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _worker_time(log_path: str) -> str | None:
    """The "worker time by stage" summary a `sferp run` logs as it ends, or None."""
    marker = "worker time by stage: "
    try:
        lines = Path(log_path).read_text(errors="replace").splitlines()
    except OSError:
        return None
    found = [line.split(marker, 1)[1] for line in lines if marker in line]
    return found[-1] if found else None


def _log(msg: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Bench:
    """One benchmark run; `run()` returns the results dictionary."""

    def __init__(self, cfg: BenchConfig, workdir: Path) -> None:
        """Prepare; the broker starts in `run()`."""
        self.cfg = cfg
        self.work = workdir
        self.broker: EmbeddedBroker | None = None
        self.env = _child_env()
        self.py = sys.executable
        self.results: dict[str, Any] = {
            "schema": SCHEMA,
            "mode": "quick" if cfg.quick else "full",
            "config": cfg.as_dict(),
            "variants": {},
            "latency": {},
            "memory": {},
            "problems": [],
        }

    # -- helpers --------------------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        assert self.broker is not None
        return self.broker.bootstrap

    def _group(self) -> Group:
        assert self.broker is not None
        return Group(self.broker.pid)

    def _sferp_argv(
        self, config: Path, views: Path, *extra: str, bounded: bool = True
    ) -> list[str]:
        argv = [self.py, "-m", "sferp", "run", "--config", str(config)]
        argv += ["--bootstrap", self.bootstrap, "--views", str(views)]
        if bounded:
            argv.append("--until-caught-up")
        return argv + list(extra)

    def _env(self, processes: int = 1) -> dict[str, str]:
        """Child environment with a free metrics port (base port + process id) for this run."""
        env = dict(self.env)
        env["SFERP_METRICS__PORT"] = str(_free_ports(processes))
        return env

    def _problem(self, text: str) -> None:
        _log("PROBLEM: " + text)
        self.results["problems"].append(text)

    def _measure(self, name: str, argvs: list[list[str]]) -> Measured:
        """Run processes together until all exit; log the outcome."""
        env = self._env(len(argvs))
        with self._group() as g:
            for i, argv in enumerate(argvs):
                g.spawn(argv, self.work / f"{name}.{i}.log", env=env)
            m = g.wait(self.cfg.timeout_s)
        if not m.ok:
            tails = " | ".join(p.log_tail(600).replace("\n", " ") for p in m.procs)
            self._problem(f"{name}: exit codes {[p.returncode for p in m.procs]}: {tails}")
        return m

    # -- the run --------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Measure everything; always stops the broker."""
        t0 = time.monotonic()
        self.results["started_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        self.results["machine"] = procs.machine_description()
        self.results["code"] = procs.code_version()
        with EmbeddedBroker(log_path=str(self.work / "broker.log")) as broker:
            self.broker = broker
            self._main_workload()
            for phase in (self._throughput, self._memory, self._latency):
                try:
                    phase()
                except Exception as exc:  # noqa: BLE001 - record it, measure the rest
                    if os.environ.get("SFERP_DEBUG"):
                        raise
                    self._problem(f"{phase.__name__.strip('_')}: {type(exc).__name__}: {exc}")
            self.results["broker_rss_bytes_at_end"] = procs.proc_rss_bytes(broker.pid or 0)
        self.broker = None
        self.results["machine"]["load_average_at_end"] = list(os.getloadavg())
        self.results["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        self.results["total_seconds"] = round(time.monotonic() - t0, 1)
        self.results["targets"] = report.evaluate_targets(self.results)
        self.results["complete"] = not self.results["problems"]
        return self.results

    def _main_workload(self) -> None:
        cfg = self.cfg
        ts = workload.TopicSet("main", cfg.partitions)
        _log(f"generating {cfg.events:,} messages")
        t = time.monotonic()
        stream = workload.main_stream(
            cfg.events,
            ts,
            seed=cfg.seed,
            duplicates=cfg.duplicates,
            disorder=cfg.disorder,
            bad=cfg.bad,
        )
        gen_s = time.monotonic() - t
        _log("computing the reference model")
        from sferp.reference import compute

        t = time.monotonic()
        self.expected = compute(stream.messages, ts.reference_config())
        ref_s = time.monotonic() - t
        _log("pre-loading the broker")
        ts.create(self.broker)  # type: ignore[arg-type]
        t = time.monotonic()
        workload.preload(self.bootstrap, stream.messages)
        load_s = time.monotonic() - t
        self.stream = stream
        self.main_topics = ts
        self.main_config = ts.write_config(self.work / "main.toml")
        labels = Counter(lbl.split(":", 1)[0] for lbl in stream.labels)
        self.results["workload"] = {
            "messages": len(stream),
            "orders": stream.orders,
            "partitions_per_topic": cfg.partitions,
            "topics": ts.inputs,
            "seed": cfg.seed,
            "duplicates": cfg.duplicates,
            "disorder": cfg.disorder,
            "bad": cfg.bad,
            "payload_bytes": stream.payload_bytes(),
            "labels": dict(labels),
            "per_topic": dict(Counter(m.topic for m in stream.messages)),
            "records_expected": len(self.expected.records),
            "generate_s": round(gen_s, 1),
            "reference_s": round(ref_s, 1),
            "preload_s": round(load_s, 1),
        }

    def _check_views(self, name: str, views: Path, expected: Any) -> dict[str, Any]:
        from sferp.compare import diff, load_views

        try:
            problems = diff(expected, load_views(views))
        except Exception as exc:  # noqa: BLE001 - a broken views file is a result too
            problems = [f"cannot load the views: {exc}"]
        if problems:
            self._problem(f"{name}: views differ from the reference model: {problems[0]}")
        return {"views_equal_reference": not problems, "reference_diff": problems[:10]}

    def _variant(self, name: str, kind: str, argvs: list[list[str]], **info: Any) -> Measured:
        """Run a throughput variant `repeat` times; keep every run, report the median."""
        runs = []
        pre = info.pop("before_each", None)
        for r in range(self.cfg.repeat):
            _log(f"{name}: run {r + 1}/{self.cfg.repeat}")
            if pre:
                pre()
            runs.append(self._measure(f"{name}.{r}", argvs))
        runs.sort(key=lambda m: m.wall_s)
        med = runs[len(runs) // 2]
        n = len(self.stream)
        entry = {
            "kind": kind,
            "events": n,
            "ok": all(m.ok for m in runs),
            "events_per_s": round(n / med.wall_s, 1),
            "runs_events_per_s": [round(n / m.wall_s, 1) for m in runs],
            **med.as_dict(),
            **info,
        }
        entry["peak_rss_bytes"] = max(p.peak_rss_bytes for p in med.procs)
        if kind == "sferp":  # where each process's workers spent the run (its closing line)
            entry["worker_time"] = [_worker_time(p.log_path) for p in med.procs]
        self.results["variants"][name] = entry
        _log(
            f"{name}: {entry['events_per_s']:,.0f} events/s, wall {med.wall_s:.1f} s, "
            f"cpu {med.cpu_s:.1f} s, broker cpu {med.broker_cpu_s:.1f} s, "
            f"other {med.other_cpu_s:.1f} s"
        )
        return med

    def _counts_of(self, m: Measured) -> dict[str, Any]:
        try:
            text = Path(m.procs[0].log_path).read_text().strip().splitlines()[-1]
            return orjson.loads(text)
        except (OSError, IndexError, orjson.JSONDecodeError):
            return {}

    def _throughput(self) -> None:
        cfg = self.cfg
        ts = self.main_topics
        topics = list(ts.inputs.values())
        m = self._variant(
            "raw_floor",
            "baseline",
            [
                [
                    self.py,
                    "-m",
                    "sferp.benchmarks.rawfloor",
                    "--bootstrap",
                    self.bootstrap,
                    "--batch-size",
                    str(cfg.batch_size),
                    *topics,
                ]
            ],
        )
        self._record_counts("raw_floor", m, "messages")
        roles = ts.reference_config().topics
        m = self._variant(
            "textbook",
            "baseline",
            [
                [
                    self.py,
                    "-m",
                    "sferp.benchmarks.textbook",
                    "--bootstrap",
                    self.bootstrap,
                    "--batch-size",
                    str(cfg.batch_size),
                    *(f"{t}={r}" for t, r in roles.items()),
                ]
            ],
        )
        self._record_counts("textbook", m, "messages")

        # Fixed cost of a run: start, build, find nothing to read, flush, exit.
        empty = workload.TopicSet("empty", cfg.partitions)
        empty.create(self.broker)  # type: ignore[arg-type]
        empty_cfg = empty.write_config(self.work / "empty.toml")
        _log("sferp on empty topics (fixed cost of a run)")
        m = self._measure("sferp_empty", [self._sferp_argv(empty_cfg, self.work / "empty.duckdb")])
        self.results["startup"] = {
            "wall_s": round(m.wall_s, 3),
            "cpu_s": round(m.cpu_s, 3),
            "peak_rss_bytes": m.procs[0].peak_rss_bytes,
            "ok": m.ok,
        }

        views = {k: self.work / f"{k}.duckdb" for k in ("sferp_1w", "sferp_w2", "sferp_2p")}

        def fresh(path: Path) -> Callable[[], None]:
            # Every run starts from no views file, as the first does: a run without
            # a recovery store would otherwise spend its start emptying the last one.
            def remove() -> None:
                for f in (path, Path(f"{path}.wal")):
                    f.unlink(missing_ok=True)

            return remove

        self._variant(
            "sferp_1w",
            "sferp",
            [self._sferp_argv(self.main_config, views["sferp_1w"])],
            before_each=fresh(views["sferp_1w"]),
        )
        self.results["variants"]["sferp_1w"].update(
            self._check_views("sferp_1w", views["sferp_1w"], self.expected)
        )
        self._variant(
            "sferp_w2",
            "sferp",
            [self._sferp_argv(self.main_config, views["sferp_w2"], "-w", "2")],
            before_each=fresh(views["sferp_w2"]),
        )
        self.results["variants"]["sferp_w2"].update(
            self._check_views("sferp_w2", views["sferp_w2"], self.expected)
        )
        addresses = f"127.0.0.1:{_free_port()};127.0.0.1:{_free_port()}"
        self._variant(
            "sferp_2p",
            "sferp",
            [
                self._sferp_argv(self.main_config, views["sferp_2p"], "-i", str(i), "-a", addresses)
                for i in range(2)
            ],
            before_each=fresh(views["sferp_2p"]),
        )
        self.results["variants"]["sferp_2p"].update(
            self._check_views("sferp_2p", views["sferp_2p"], self.expected)
        )

        rec_dir = self.work / "recovery"
        rec_views = self.work / "sferp_1w_recovery.duckdb"

        def fresh_store() -> None:
            shutil.rmtree(rec_dir, ignore_errors=True)
            for f in (rec_views, Path(f"{rec_views}.wal")):
                f.unlink(missing_ok=True)

        m = self._variant(
            "sferp_1w_recovery",
            "sferp",
            [self._sferp_argv(self.main_config, rec_views, "--recovery-dir", str(rec_dir))],
            before_each=fresh_store,
        )
        entry = self.results["variants"]["sferp_1w_recovery"]
        entry.update(self._check_views("sferp_1w_recovery", rec_views, self.expected))
        snap = memory.snapshot_size(rec_dir) if rec_dir.exists() else {}
        base = self.results["variants"]["sferp_1w"]["wall_s"]
        epochs = snap.get("last_epoch") or 0
        self.results["recovery"] = {
            **snap,
            "snapshot_interval_s": 5,
            "wall_s_with": entry["wall_s"],
            "wall_s_without": base,
            "overhead_s": round(entry["wall_s"] - base, 3),
            "overhead_fraction": round(entry["wall_s"] / base - 1, 4) if base else None,
            "per_snapshot_s": round((entry["wall_s"] - base) / epochs, 3) if epochs else None,
        }

    def _record_counts(self, name: str, m: Measured, field: str) -> None:
        counts = self._counts_of(m)
        entry = self.results["variants"][name]
        entry["counts"] = counts
        if counts.get(field) != len(self.stream):
            self._problem(
                f"{name}: read {counts.get(field)} messages, the stream has {len(self.stream)}"
            )

    def _memory(self) -> None:
        cfg = self.cfg
        from sferp.reference import compute

        for label, n in zip(("small", "large"), cfg.fill, strict=True):
            ts = workload.TopicSet(f"fill{n}", cfg.partitions)
            _log(f"fill stream: {n:,} records")
            stream = workload.fill_stream(n, ts, seed=cfg.seed + 1)
            ts.create(self.broker)  # type: ignore[arg-type]
            workload.preload(self.bootstrap, stream.messages)
            config = ts.write_config(self.work / f"fill{n}.toml")
            views = self.work / f"fill{n}.duckdb"
            m = self._measure(f"fill{n}", [self._sferp_argv(config, views)])
            import duckdb

            try:
                with connect(str(views), read_only=True) as con:
                    total, live = con.execute(
                        "SELECT count(*), count(*) FILTER (WHERE NOT deleted) FROM records"
                    ).fetchone()
            except duckdb.Error as exc:
                self._problem(f"fill{n}: cannot read the views: {exc}")
                total = live = 0
            base = self.results.get("startup", {}).get("peak_rss_bytes", 0)
            peak = m.procs[0].peak_rss_bytes
            entry = {
                "messages": len(stream),
                "records": total,
                "live_records": live,
                "peak_rss_bytes": peak,
                "empty_run_peak_rss_bytes": base,
                "bytes_per_live_record": round((peak - base) / live, 1) if live else None,
                "events_per_s": round(len(stream) / m.wall_s, 1),
                "ok": m.ok,
                **m.as_dict(),
            }
            if label == "small" or cfg.quick:
                entry.update(
                    self._check_views(
                        f"fill{n}", views, compute(stream.messages, ts.reference_config())
                    )
                )
            self.results["memory"][f"fill_{label}"] = entry
            _log(f"fill{n}: {live:,} live records, peak RSS {peak / 2**20:,.0f} MiB")
        small, large = self.results["memory"]["fill_small"], self.results["memory"]["fill_large"]
        if large["live_records"] > small["live_records"]:
            self.results["memory"]["marginal_bytes_per_live_record"] = round(
                (large["peak_rss_bytes"] - small["peak_rss_bytes"])
                / (large["live_records"] - small["live_records"]),
                1,
            )
        n = 100_000 if cfg.quick else 1_000_000
        _log(f"de-duplication memory: {n:,} identities")
        self.results["memory"]["dedup"] = memory.dedup_bytes_per_identity(n)

    def _latency(self) -> None:
        cfg = self.cfg
        base = self.results["variants"].get("sferp_1w", {})
        capacity = base.get("events_per_s") or 0
        if not capacity or not base.get("ok"):
            self._problem("latency: no 1-worker maximum to load the flow with")
            return
        for pct in cfg.latency_loads:
            rate = capacity * pct / 100
            n = max(1, math.ceil(rate * cfg.latency_s))
            ts = workload.TopicSet(f"live{pct}", cfg.partitions)
            stream = workload.retarget(self.stream, ts, n, seed=cfg.seed + 1000 + pct)
            every = max(1, round(rate / cfg.samples_per_s))
            samples = latency.pick_samples(
                stream.messages, stream.labels, ts.reference_config(), every
            )
            ts.create(self.broker)  # type: ignore[arg-type]
            config = ts.write_config(self.work / f"live{pct}.toml")
            views = self.work / f"live{pct}.duckdb"
            # The writer opens the views (and its query endpoint) with the first items:
            # a small primer, produced before the flow starts, brings it up.
            primer = min(len(stream) // 50 + 1, 2000)
            workload.preload(self.bootstrap, stream.messages[:primer], processes=1)
            samples = [
                dataclasses.replace(s, index=s.index - primer) for s in samples if s.index >= primer
            ]
            _log(f"latency at {pct} %: {rate:,.0f} events/s for {cfg.latency_s:.0f} s")
            env = self._env()
            with self._group() as g:
                g.spawn(
                    self._sferp_argv(config, views, bounded=False),
                    self.work / f"live{pct}.log",
                    env=env,
                )
                if not self._wait_endpoint(views, g):
                    m = g.wait(1)
                    self._problem(f"latency {pct} %: the flow did not come up")
                    continue
                port = int(env["SFERP_METRICS__PORT"])
                busy_before, busy_t0 = latency.scrape_busy(port), time.monotonic()
                phase = latency.run_phase(
                    self.bootstrap,
                    str(views),
                    stream.messages[primer:],
                    samples,
                    rate,
                    warmup_s=cfg.latency_warmup_s,
                    drain_timeout_s=cfg.latency_drain_s,
                    expected_consumed=len(stream),
                )
                phase["worker_busy"] = latency.busy_between(
                    busy_before, latency.scrape_busy(port), time.monotonic() - busy_t0
                )
                phase["primer_messages"] = primer
                phase["consumed_at_end"] = latency.consumed(str(views))
                phase["flow_commit_histogram"] = latency.scrape_commit_histogram(
                    int(env["SFERP_METRICS__PORT"])
                )
                g.signal(signal.SIGTERM)
                m = g.wait(120)
            phase["load_fraction"] = pct / 100
            phase["flow"] = m.as_dict()
            phase["flow"]["peak_rss_bytes"] = m.procs[0].peak_rss_bytes
            # The producer is a child of this process: its CPU time is not "other programs".
            phase["flow"]["other_cpu_s"] = round(
                max(0.0, m.other_cpu_s - phase.get("producer_cpu_s", 0.0)), 3
            )
            phase["flow_exit_ok"] = m.ok
            if not m.ok:
                self._problem(f"latency {pct} %: the live flow exited {m.procs[0].returncode}")
            if phase.get("producer_error"):
                self._problem(f"latency {pct} %: producer: {phase['producer_error']}")
            self.results["latency"][f"load_{pct}"] = phase
            _log(
                f"latency at {pct} %: p50 {phase['p50_s']} s, p95 {phase['p95_s']} s, "
                f"p99 {phase['p99_s']} s ({phase['samples_counted']} samples, "
                f"{phase['samples_unobserved']} unobserved)"
            )

    def _wait_endpoint(self, views: Path, g: Group, timeout_s: float = 60) -> bool:
        from sferp.connectors.query_server import endpoint_path

        from sferp.query import QueryFailed, fetch

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if g.poll():
                return False
            if os.path.exists(endpoint_path(str(views))):
                try:
                    fetch("SELECT 1", str(views), max_rows=1, timeout_s=5)
                    return True
                except QueryFailed:
                    pass
            time.sleep(0.1)
        return False
