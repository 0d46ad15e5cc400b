"""`sferp plan --peak N`: how many worker processes a peak needs, from measured results.

The model is deliberately small and stated with every answer:

- capacity of one process = the measured events/s of `sferp run` with 1 worker
  (the whole contract: decode, merge, views, DuckDB, Kafka outputs);
- more processes: Amdahl's law fitted to the measured 2-process speedup
  (`S2 = 1 / ((1 - p) + p / 2)` gives the parallel fraction p), so the serial
  parts (the single coordinator key and DuckDB writer) cap the gain;
- each process should run at most at `--max-load` of its capacity (default
  0.7: 30 % headroom for bursts, catch-up after restarts and noisy neighbours);
- latency: the measured p50/p99 at 50 % and 80 % load, interpolated to the
  planned load per process.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import orjson

MAX_PROCESSES = 512
# The p99 consume-to-commit threshold of alert SferpViewCommitSlow
# (monitoring/prometheus/alerts.yml).
COMMIT_ALERT_S = 2.0


class _Usage(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _Usage(message)


def _parser() -> _Parser:
    p = _Parser(
        prog="sferp plan",
        description="Recommend worker processes and expected latency for a peak load.",
    )
    p.add_argument("--peak", type=float, required=True, help="peak events per second")
    p.add_argument(
        "--results",
        help="benchmark results JSON (default: the newest full run in benchmarks/results, "
        "else reference.json)",
    )
    p.add_argument(
        "--max-load",
        type=float,
        default=0.7,
        help="highest fraction of measured capacity a process may run at (default 0.7)",
    )
    return p


def find_results(results_dir: Path) -> Path | None:
    """The newest full-mode results file in `results_dir`, else its reference.json."""
    best: tuple[str, Path] | None = None
    for path in results_dir.glob("*.json"):
        if path.name == "reference.json":
            continue
        try:
            data = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue
        if data.get("mode") != "full" or not data.get("variants", {}).get("sferp_1w"):
            continue
        stamp = str(data.get("started_at", ""))
        if best is None or stamp > best[0]:
            best = (stamp, path)
    if best is not None:
        return best[1]
    ref = results_dir / "reference.json"
    return ref if ref.exists() else None


def parallel_fraction(speedup_2: float) -> float:
    """Amdahl's parallel fraction from the speedup of 2 processes over 1 (clipped to [0, 1])."""
    if speedup_2 <= 1.0:
        return 0.0
    return min(1.0, 2.0 * (1.0 - 1.0 / speedup_2))


def speedup(n: int, p: float) -> float:
    """Amdahl's speedup of n processes for parallel fraction p."""
    return 1.0 / ((1.0 - p) + p / n)


def _interp(load: float, points: list[tuple[float, float | None]]) -> float | None:
    """Linear interpolation in load between measured (load, value) points; None if unknown."""
    pts = sorted((x, y) for x, y in points if y is not None)
    if not pts:
        return None
    if load <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if load <= x1:
            return y0 + (y1 - y0) * (load - x0) / (x1 - x0)
    return None  # beyond the highest measured load


def plan(results: dict[str, Any], peak: float, max_load: float) -> dict[str, Any]:
    """The recommendation as data (see `render`)."""
    v = results["variants"]
    c1 = float(v["sferp_1w"]["events_per_s"])
    c2 = float(v.get("sferp_2p", {}).get("events_per_s") or 0)
    s2 = c2 / c1 if c2 else 1.0
    p = parallel_fraction(s2)
    n = None
    for k in range(1, MAX_PROCESSES + 1):
        if c1 * speedup(k, p) * max_load >= peak:
            n = k
            break
    limit = c1 / (1.0 - p) if p < 1.0 else float("inf")
    other = sum(float(x.get("other_cpu_s") or 0) for x in v.values())
    capacity = sum(float(x.get("machine_cpu_capacity_s") or 0) for x in v.values())
    lat = results.get("latency", {})
    loads = [(x["load_fraction"], x.get("p50_s"), x.get("p99_s")) for x in lat.values()]
    out: dict[str, Any] = {
        "peak": peak,
        "max_load": max_load,
        "capacity_per_process": c1,
        "speedup_2": s2,
        "parallel_fraction": p,
        "processes": n,
        "ceiling_at_max_load": limit * max_load,
        "linear_processes": math.ceil(peak / (c1 * max_load)),
        "other_load": other / capacity if capacity else None,
    }
    if n is not None:
        load = peak / (c1 * speedup(n, p))
        out["load_per_process"] = load
        out["p50_s"] = _interp(load, [(x, y) for x, y, _ in loads])
        out["p99_s"] = _interp(load, [(x, z) for x, _, z in loads])
        out["latency_loads"] = [x for x, _, _ in loads]
        commits = [
            (x["load_fraction"], (x.get("flow_commit_histogram") or {}).get("p99_le_s"))
            for x in lat.values()
        ]
        out["commit_p99_le_s"] = _interp(load, commits)
        known = [x for x, y in commits if y is not None]
        out["commit_lowest_load"] = min(known) if known else None
    return out


def render(pl: dict[str, Any], results: dict[str, Any], source: Path) -> str:
    """The answer in a few lines; the assumptions in two."""
    m = results.get("machine", {})
    lines = []
    peak = pl["peak"]
    if pl["processes"] is None:
        lines.append(
            f"peak {peak:,.0f} events/s: not reachable by adding processes under the measured "
            f"scaling (2 processes gave {pl['speedup_2']:.2f}x: a ceiling of "
            f"{pl['ceiling_at_max_load']:,.0f} events/s at {pl['max_load']:.0%} load); with "
            f"linear scaling it would take {pl['linear_processes']} processes"
        )
    else:
        n = pl["processes"]
        cmd = (
            "sferp run" if n == 1 else f"sferp run -i 0..{n - 1} -a <{n} addresses>, 1 worker each"
        )
        lines.append(
            f"peak {peak:,.0f} events/s: {n} worker process{'es' if n > 1 else ''} "
            f"({cmd}), {n} core{'s' if n > 1 else ''}; each runs at "
            f"{pl['load_per_process']:.0%} of its measured capacity (limit {pl['max_load']:.0%})"
        )
        p50, p99 = pl.get("p50_s"), pl.get("p99_s")
        loads = pl.get("latency_loads") or []
        if p50 is not None and p99 is not None:
            lines.append(
                f"expected end-to-end latency: p50 about {p50:.2f} s, p99 about {p99:.2f} s"
            )
        elif loads:
            lines.append(
                "expected end-to-end latency: not measured at this load (measured at "
                + ", ".join(f"{x:.0%}" for x in sorted(loads))
                + ")"
            )
        else:
            lines.append("expected end-to-end latency: not measured in these results")
        commit, lowest = pl.get("commit_p99_le_s"), pl.get("commit_lowest_load")
        if commit is not None and lowest is not None and commit > COMMIT_ALERT_S:
            # The alert's 2 s is the integration's response-time limit, not the flow's own.
            if pl["load_per_process"] < lowest:
                lines.append(
                    f"note: the consume-to-commit p99 was up to {commit:.1f} s at {lowest:.0%} "
                    f"load, the lowest measured, above the {COMMIT_ALERT_S:.0f} s of alert "
                    "SferpViewCommitSlow; lighter loads were not measured"
                )
            else:
                lines.append(
                    f"warning: the consume-to-commit p99 is up to {commit:.1f} s at this load, "
                    f"above the {COMMIT_ALERT_S:.0f} s of alert SferpViewCommitSlow: expect it "
                    "to fire; a lower --max-load or faster cores keep it quiet"
                )
    lines.append(
        f"assumes: {pl['capacity_per_process']:,.0f} events/s per process (1 worker, whole "
        f"contract, measured on a {m.get('cores')}-core {m.get('cpu_model')}), one core per "
        f"process, Kafka elsewhere; scaling by Amdahl's law fitted to the measured 2-process "
        f"speedup {pl['speedup_2']:.2f}x (parallel fraction {pl['parallel_fraction']:.2f})"
    )
    lines.append(
        "assumes: the benchmark's event mix (5 % duplicates, 20 % disorder); latency measured "
        "with one process at 50 % and 80 % load, interpolated to the planned load"
    )
    lines.append(
        f"from: {_shown(source)} ({results.get('mode')} run of {results.get('started_at')})"
    )
    other = pl.get("other_load")
    if other is not None and other > 0.15:
        lines.append(
            f"warning: other programs used {other:.0%} of the CPU while these results were "
            "measured; re-run 'make bench' on a quiet machine for firmer numbers"
        )
    return "\n".join(lines)


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it lies below it, else as given."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def cli_plan(argv: list[str], results_dir: Path) -> int:
    """`sferp plan`: 0 with an answer, 2 for bad usage or unusable results."""
    try:
        args = _parser().parse_args(argv)
    except _Usage as exc:
        print(f"sferp plan: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    if not args.peak > 0:
        print("sferp plan: --peak: must be above 0 events/s", file=sys.stderr)
        return 2
    if not 0 < args.max_load <= 1:
        print("sferp plan: --max-load: must be a fraction in (0, 1]", file=sys.stderr)
        return 2
    source = Path(args.results) if args.results else find_results(results_dir)
    if source is None:
        print(
            f"sferp plan: --results: no benchmark results in {results_dir}; run 'sferp bench'",
            file=sys.stderr,
        )
        return 2
    try:
        results = orjson.loads(source.read_bytes())
        results["variants"]["sferp_1w"]["events_per_s"]
    except OSError as exc:
        print(f"sferp plan: --results: cannot read {source}: {exc.strerror}", file=sys.stderr)
        return 2
    except orjson.JSONDecodeError:
        print(f"sferp plan: --results: {source} is not JSON", file=sys.stderr)
        return 2
    except (KeyError, TypeError):
        print(
            f"sferp plan: --results: {source} has no 1-worker result "
            "(variants.sferp_1w.events_per_s): not a results file of 'sferp bench'",
            file=sys.stderr,
        )
        return 2
    print(render(plan(results, args.peak, args.max_load), results, source))
    return 0
