"""Benchmark results: targets with PASS/FAIL, the JSON file, a Markdown report and PNG charts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

MIB = 1 << 20
GB = 10**9

VARIANT_TITLES = {
    "raw_floor": "raw floor (kafka-python + orjson)",
    "textbook": "textbook Bytewax flow",
    "sferp_1w": "sferp, 1 worker",
    "sferp_w2": "sferp, -w 2 (2 threads)",
    "sferp_2p": "sferp, 2 processes",
    "sferp_1w_recovery": "sferp, 1 worker, recovery on",
}


def _get(d: dict[str, Any], *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)  # type: ignore[assignment]
    return d


def _target(
    tid: str, name: str, goal: str, measured: str, passed: bool | None, note: str = ""
) -> dict[str, Any]:
    status = "N/A" if passed is None else ("PASS" if passed else "FAIL")
    return {
        "id": tid,
        "name": name,
        "goal": goal,
        "measured": measured,
        "status": status,
        "note": note,
    }


def evaluate_targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with its measured value and PASS, FAIL or N/A."""
    v = r.get("variants", {})
    raw = _get(v, "raw_floor", "events_per_s")
    one = _get(v, "sferp_1w", "events_per_s")
    tb = _get(v, "textbook", "events_per_s")
    two = _get(v, "sferp_2p", "events_per_s")
    out = []

    if raw and one:
        ratio = one / raw
        out.append(
            _target(
                "floor",
                "1 worker, whole contract, vs the raw kafka-python floor",
                ">= 35 % (stretch 50 %)",
                f"{ratio:.1%} ({one:,.0f} vs {raw:,.0f} events/s)",
                ratio >= 0.35,
                "stretch met" if ratio >= 0.5 else "stretch not met",
            )
        )
    else:
        out.append(_target("floor", "1 worker vs raw floor", ">= 35 %", "not measured", False))

    if tb and one:
        ratio = one / tb
        out.append(
            _target(
                "textbook",
                "1 worker vs the textbook Bytewax flow",
                ">= 1.5x",
                f"{ratio:.2f}x ({one:,.0f} vs {tb:,.0f} events/s)",
                ratio >= 1.5,
            )
        )
    else:
        out.append(_target("textbook", "1 worker vs textbook", ">= 1.5x", "not measured", False))

    if two and one:
        ratio = two / one
        b1 = _get(v, "sferp_1w", "broker_cpu_s")
        b2 = _get(v, "sferp_2p", "broker_cpu_s")
        o2 = _get(v, "sferp_2p", "other_cpu_s")
        out.append(
            _target(
                "scaling",
                "2 processes vs 1 worker (2-core machine)",
                ">= 1.4x",
                f"{ratio:.2f}x ({two:,.0f} vs {one:,.0f} events/s)",
                ratio >= 1.4,
                f"broker CPU {b2:.1f} s (1 worker: {b1:.1f} s); other programs {o2:.1f} CPU-s",
            )
        )
    else:
        out.append(_target("scaling", "2 processes vs 1 worker", ">= 1.4x", "not measured", False))

    lat = _get(r, "latency", "load_80")
    if lat:
        p99 = lat.get("p99_s")
        unobserved = lat.get("samples_unobserved", 0)
        if p99 is None:
            measured = f"> {lat.get('drain_timeout_s')} s ({unobserved} samples never seen)"
            passed = False
        else:
            measured = f"{p99:.2f} s (p50 {lat['p50_s']:.2f} s, {lat['samples_counted']} samples)"
            passed = p99 <= 2.0
        achieved = lat.get("achieved_rate") or 0
        out.append(
            _target(
                "latency",
                "p99 end-to-end latency at 80 % of the 1-worker maximum",
                "<= 2 s",
                measured,
                passed,
                f"{achieved:,.0f} events/s for {lat.get('produce_seconds')} s",
            )
        )
    else:
        out.append(_target("latency", "p99 latency at 80 % load", "<= 2 s", "not measured", False))

    fill = _get(r, "memory", "fill_large")
    if fill and fill.get("live_records"):
        live = fill["live_records"]
        peak = fill["peak_rss_bytes"]
        measured = f"{peak / GB:.2f} GB at {live:,} live records"
        if live >= 900_000:
            out.append(
                _target("rss", "peak RSS at 1M live records", "<= 1.5 GB", measured, peak <= 1.5e9)
            )
        else:
            per = _get(r, "memory", "marginal_bytes_per_live_record") or 0
            est = peak + per * (1_000_000 - live)
            out.append(
                _target(
                    "rss",
                    "peak RSS at 1M live records",
                    "<= 1.5 GB",
                    measured,
                    None,
                    f"not a 1M-record run; estimate from the marginal cost per record: "
                    f"{est / GB:.2f} GB",
                )
            )
    else:
        out.append(
            _target("rss", "peak RSS at 1M live records", "<= 1.5 GB", "not measured", False)
        )
    return out


# --- files -------------------------------------------------------------------------------------


def write_all(results: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    """Write `<name>.json`, the charts and `<name>.md` into `out_dir`; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    charts = write_charts(results, out_dir, name)
    results["charts"] = [p.name for p in charts]
    json_path = out_dir / f"{name}.json"
    json_path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2) + b"\n")
    paths.append(json_path)
    md = out_dir / f"{name}.md"
    md.write_text(markdown(results, name))
    paths.append(md)
    return paths + charts


def summary(r: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    lines = [f"sferp bench ({r['mode']}, {r.get('total_seconds')} s):"]
    for key, title in VARIANT_TITLES.items():
        e = r["variants"].get(key)
        if e:
            ok = "" if e.get("ok") else "  (FAILED)"
            lines.append(f"  {title:<34} {e['events_per_s']:>10,.0f} events/s{ok}")
    for key in ("load_50", "load_80"):
        lat = r["latency"].get(key)
        if lat:
            lines.append(
                f"  latency at {int(lat['load_fraction'] * 100)} % load: p50 {_s(lat['p50_s'])}, "
                f"p99 {_s(lat['p99_s'], lat.get('drain_timeout_s'))}"
            )
    other, cap = _other_load(r)
    if cap:
        lines.append(
            f"  other programs used {other / cap:.0%} of the CPU while the variants ran "
            f"(load average at start {r['machine']['load_average_at_start'][0]:.1f})"
        )
    for t in r.get("targets", []):
        lines.append(f"  [{t['status']}] {t['name']}: {t['measured']} (goal {t['goal']})")
    for p in r.get("problems", []):
        lines.append(f"  problem: {p}")
    return "\n".join(lines)


def _other_load(r: dict[str, Any]) -> tuple[float, float]:
    """CPU-seconds other programs used, and CPU-seconds available, over the throughput runs."""
    other = sum((e.get("other_cpu_s") or 0) for e in r["variants"].values())
    cap = sum((e.get("machine_cpu_capacity_s") or 0) for e in r["variants"].values())
    return other, cap


def _s(x: float | None, timeout: float | None = None) -> str:
    if x is None:
        return f"> {timeout:g} s" if timeout else "n/a"
    return f"{x:.2f} s"


def _busy(wb: dict[str, Any] | None) -> str:
    return "-" if not wb else f"{wb['total']:.0%}"


def _mib(b: float | None) -> str:
    return "n/a" if not b else f"{b / MIB:,.0f} MiB"


def markdown(r: dict[str, Any], name: str) -> str:
    """The human report of one results file."""
    m = r["machine"]
    w = r.get("workload", {})
    pk = m.get("packages", {})
    out: list[str] = []
    add = out.append
    add(f"# sferp benchmark: {name}\n")
    add(
        f"{r['mode'].capitalize()} run started {r.get('started_at')} (UTC), "
        f"{r.get('total_seconds')} s in all. Produced by `sferp bench"
        f"{' --quick' if r['mode'] == 'quick' else ''}`; every number below was measured "
        "in this run.\n"
    )
    if r["mode"] == "quick":
        add("**Quick mode is a smoke test: its numbers are too small to mean anything.**\n")
    code = r.get("code") or {}
    if code.get("commit"):
        add(
            f"Code: commit `{code['commit'][:12]}`"
            + (" with uncommitted changes" if code.get("uncommitted_changes") else "")
            + ".\n"
        )
    add("## Machine and load\n")
    add(
        f"- {m.get('cores')} cores ({m.get('cpu_model')}), {m.get('memory_bytes', 0) / 2**30:.1f} "
        f"GiB, {m.get('os')}, {m.get('python')}"
    )
    add("- " + ", ".join(f"{k} {v}" for k, v in pk.items()))
    la0 = m.get("load_average_at_start") or []
    la1 = m.get("load_average_at_end") or []
    add(
        f"- load average at start {' / '.join(f'{x:.2f}' for x in la0)}, "
        f"at end {' / '.join(f'{x:.2f}' for x in la1)}"
    )
    other, cap = _other_load(r)
    if cap:
        add(
            f"- other programs on the machine used {other:,.1f} of the {cap:,.1f} CPU-seconds "
            f"available while the throughput variants ran ({other / cap:.0%}); the per-variant "
            "figure is in the table. The broker (Tansu, embedded) shares the same cores."
        )
    add("")
    add("## Targets\n")
    add("| target | goal | measured | result | note |")
    add("|---|---|---|---|---|")
    for t in r.get("targets", []):
        add(f"| {t['name']} | {t['goal']} | {t['measured']} | **{t['status']}** | {t['note']} |")
    add("")
    if r.get("problems"):
        add("Problems in this run:\n")
        for p in r["problems"]:
            add(f"- {p}")
        add("")

    add("## Throughput\n")
    add(
        f"{w.get('messages', 0):,} messages ({w.get('payload_bytes', 0) / MIB:,.0f} MiB) of the "
        f"generated Salesforce CDC + Debezium mix: {w.get('duplicates', 0):.0%} duplicates, "
        f"{w.get('disorder', 0):.0%} disorder, {w.get('bad', 0):.1%} bad, "
        f"{w.get('partitions_per_topic')} partitions per topic, seed {w.get('seed')}; "
        f"{w.get('records_expected', 0):,} records in the resulting views. Each variant is a "
        "subprocess reading the same pre-loaded topics from the start to the end; events/s is "
        "messages / wall time from process start to exit (start-up included). CPU and peak "
        "RSS come from the kernel's accounting of each process (`wait4`).\n"
    )
    add(
        "| variant | events/s | vs raw floor | wall s | CPU s | peak RSS per process | "
        "broker CPU s | other programs CPU s | views = reference |"
    )
    add("|---|---:|---:|---:|---:|---|---:|---:|---|")
    raw = _get(r, "variants", "raw_floor", "events_per_s") or 0
    for key, title in VARIANT_TITLES.items():
        e = r["variants"].get(key)
        if not e:
            continue
        rss = " + ".join(_mib(p["peak_rss_bytes"]) for p in e.get("processes", []))
        eq = e.get("views_equal_reference")
        eq_s = "n/a" if eq is None else ("yes" if eq else "**no**")
        ok = "" if e.get("ok") else " (**failed**)"
        add(
            f"| {title}{ok} | {e['events_per_s']:,.0f} | "
            f"{(e['events_per_s'] / raw if raw else 0):.0%} | {e['wall_s']:.1f} | "
            f"{e['cpu_s']:.1f} | {rss} | {e['broker_cpu_s']:.1f} | {e['other_cpu_s']:.1f} | "
            f"{eq_s} |"
        )
    st = r.get("startup")
    if st:
        add(
            f"\nFixed cost of one sferp run (empty topics: start, build the dataflow, open the "
            f"views, flush, exit): {st['wall_s']:.2f} s wall, {st['cpu_s']:.2f} CPU-s, peak RSS "
            f"{_mib(st['peak_rss_bytes'])}."
        )
    times = [
        (VARIANT_TITLES[k], r["variants"][k]["worker_time"])
        for k in VARIANT_TITLES
        if r["variants"].get(k, {}).get("worker_time")
    ]
    if times:
        add("\nWhere the workers' time went, from each sferp run's closing log line:\n")
        for title, lines in times:
            procs = [f"process {i}: {t}" if len(lines) > 1 else t for i, t in enumerate(lines) if t]
            add(f"- {title}: " + "; ".join(procs))
    if raw:
        add(
            "\nThe textbook flow does only decode, de-duplication and per-record merge (no views, "
            "no DuckDB, no Kafka outputs); sferp does the whole contract."
        )
    add(_img(r, name, "throughput"))

    one = _get(r, "variants", "sferp_1w")
    if one:
        add("## Scaling\n")
        for key in ("sferp_w2", "sferp_2p"):
            e = r["variants"].get(key)
            if e:
                add(
                    f"- {VARIANT_TITLES[key]}: {e['events_per_s'] / one['events_per_s']:.2f}x "
                    f"1 worker; CPU {e['cpu_s']:.1f} s (1 worker: {one['cpu_s']:.1f} s), broker "
                    f"CPU {e['broker_cpu_s']:.1f} s (1 worker: {one['broker_cpu_s']:.1f} s)."
                )
        add(
            "\nBytewax workers of one process are threads sharing Python's GIL; processes are "
            "the unit that uses more cores. On this 2-core machine the broker takes its CPU "
            "from the same two cores."
        )
        add(_img(r, name, "scaling"))

    if r.get("latency"):
        add("## End-to-end latency under steady load\n")
        add(
            "| load | target events/s | achieved | samples | p50 | p95 | p99 | max | never seen | "
            "worker busy | flow CPU s | broker CPU s | producer CPU s | peak RSS |"
        )
        add("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for lat in r["latency"].values():
            f = lat.get("flow", {})
            add(
                f"| {lat['load_fraction']:.0%} | {lat['target_rate']:,.0f} | "
                f"{(lat.get('achieved_rate') or 0):,.0f} | {lat['samples_counted']} | "
                f"{_s(lat['p50_s'])} | {_s(lat['p95_s'])} | "
                f"{_s(lat['p99_s'], lat['drain_timeout_s'])} | "
                f"{_s(lat['max_s'], lat['drain_timeout_s'])} | {lat['samples_unobserved']} | "
                f"{_busy(lat.get('worker_busy'))} | "
                f"{f.get('cpu_s', 0):.1f} | {f.get('broker_cpu_s', 0):.1f} | "
                f"{lat.get('producer_cpu_s', 0):.1f} | {_mib(f.get('peak_rss_bytes'))} |"
            )
        any_lat = next(iter(r["latency"].values()))
        add(
            f"\nMethod: a live `sferp run` (1 worker, no recovery store) on fresh topics; a "
            f"producer process sends the stream at a fixed rate (a percentage of the 1-worker "
            f"events/s above) for {r['config']['latency_s']:g} s. About "
            f"{r['config']['samples_per_s']:g} messages a second are samples: applied changes "
            "newer than every earlier message of their record, whose send time the producer "
            f"records. The benchmark polls the writer's query endpoint every "
            f"{any_lat['poll_s']:g} s (what `sferp query` uses while a flow runs) for those "
            "records' `records.version`; a sample's latency is the arrival time of the first "
            "answer showing its version minus its send time, so it includes Kafka, the flow, "
            "the DuckDB commit (every 0.25 s) and up to one poll interval. Samples sent in the "
            f"first {any_lat['warmup_s']:g} s are not counted (warm-up); a sample not seen "
            f"{any_lat['drain_timeout_s']:g} s after the producer finished counts as infinitely "
            "late. Worker busy: the share of the phase the worker spent inside the flow's stages "
            "(`sferp_worker_busy_seconds_total`, scraped at the phase's start and end); near "
            "100 % the worker has no headroom and changes queue up in Kafka."
        )
        for lat in r["latency"].values():
            wb = lat.get("worker_busy")
            if wb:
                shares = ", ".join(
                    f"{stage} {x:.0%}" for stage, x in wb["stages"].items() if round(x * 100) >= 1
                )
                add(f"- {lat['load_fraction']:.0%} load, worker busy by stage: {shares}")
        add(_img(r, name, "latency"))

    mem = r.get("memory", {})
    if mem:
        add("## Memory\n")
        add("| run | messages | live records | peak RSS | bytes per live record | events/s |")
        add("|---|---:|---:|---:|---:|---:|")
        for key in ("fill_small", "fill_large"):
            e = mem.get(key)
            if e:
                per = e.get("bytes_per_live_record")
                add(
                    f"| initial load, 1 worker | {e['messages']:,} | {e['live_records']:,} | "
                    f"{_mib(e['peak_rss_bytes'])} | {per:,.0f} | {e['events_per_s']:,.0f} |"
                    if per
                    else f"| initial load | {e['messages']:,} | 0 | n/a | n/a | n/a |"
                )
        slope = mem.get("marginal_bytes_per_live_record")
        if slope:
            add(
                f"\nBetween the two runs each additional live record cost {slope:,.0f} bytes of "
                "peak RSS (the difference of the peaks over the difference of the records)."
            )
        add(
            "\nA fill stream is the first change of each record from the same simulation (an "
            "initial load: one message per record), so the live records are the merged state, "
            "the view rows and the DuckDB tables of that many records. Bytes per live record = "
            "(peak RSS - peak RSS of a run on empty topics) / live records; it includes the "
            "DuckDB writer's memory, which lives in process 0 only."
        )
        d = mem.get("dedup")
        if d:
            add(
                f"\nDe-duplication: {d['bytes_per_identity']:,.1f} bytes per remembered identity "
                f"(`operators/dedupe.py` DedupWindow filled with {d['identities']:,} distinct "
                "identities inside one window, measured with tracemalloc)."
            )
    rec = r.get("recovery")
    if rec:
        add("\n## Recovery snapshots\n")
        add(
            f"1 worker with `--recovery-dir`, snapshot every {rec['snapshot_interval_s']} s: "
            f"{rec.get('wall_s_with', 0):.1f} s wall against {rec.get('wall_s_without', 0):.1f} s "
            f"without ({(rec.get('overhead_fraction') or 0):+.1%}). Full snapshot (newest state "
            f"of {rec.get('state_keys', 0):,} keys): {_mib(rec.get('state_bytes'))}; recovery "
            f"store on disk at the end: {_mib(rec.get('dir_bytes'))}; "
            f"{rec.get('last_epoch', 0)} epochs"
            + (
                f", about {rec['per_snapshot_s']:.2f} s per snapshot."
                if (rec.get("per_snapshot_s") or 0) > 0
                else "; the difference is within the noise of one run."
            )
        )
    add("\n## Workload preparation\n")
    add(
        f"Generating the stream took {w.get('generate_s')} s, the reference model "
        f"{w.get('reference_s')} s, pre-loading the broker {w.get('preload_s')} s (one "
        "producer process per core). Expected outcomes of the messages: "
        + ", ".join(f"{k} {v:,}" for k, v in sorted(w.get("labels", {}).items()))
        + "."
    )
    add("\n## Reproduce\n")
    add("```sh\nmake bench                       # this report, 15 to 20 minutes on 2 cores")
    add("make bench-quick                 # the smoke test, under a minute")
    add("sferp plan --peak 50000          # size a deployment from the newest results\n```")
    return "\n".join(out) + "\n"


def _img(r: dict[str, Any], name: str, what: str) -> str:
    file = f"{name}-{what}.png"
    if file in r.get("charts", []):
        return f"\n![{what}]({file})\n"
    return ""


# --- charts ------------------------------------------------------------------------------------


def write_charts(r: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    """Throughput per variant, scaling, latency percentiles per load (PNG, matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    v = r["variants"]

    keys = [k for k in VARIANT_TITLES if k in v]
    if keys:
        fig, ax = plt.subplots(figsize=(8, 4))
        vals = [v[k]["events_per_s"] for k in keys]
        colors = ["#999999" if v[k]["kind"] == "baseline" else "#2b6cb0" for k in keys]
        bars = ax.barh([VARIANT_TITLES[k] for k in keys], vals, color=colors)
        raw = v.get("raw_floor", {}).get("events_per_s")
        if raw:
            for frac, style in ((0.35, "--"), (0.5, ":")):
                ax.axvline(
                    raw * frac,
                    color="#c05621",
                    linestyle=style,
                    linewidth=1,
                    label=f"{frac:.0%} of the raw floor",
                )
            ax.legend(fontsize=8, loc="lower right")
        for b, val in zip(bars, vals, strict=True):
            ax.text(
                b.get_width(),
                b.get_y() + b.get_height() / 2,
                f" {val:,.0f}",
                va="center",
                fontsize=8,
            )
        ax.invert_yaxis()
        ax.set_xlabel("events/s (messages / wall time)")
        ax.set_title(f"Throughput, {r.get('workload', {}).get('messages', 0):,} messages")
        ax.set_xlim(0, max(vals) * 1.2)
        fig.tight_layout()
        p = out_dir / f"{name}-throughput.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)

    if "sferp_1w" in v:
        one = v["sferp_1w"]["events_per_s"]
        pts = [("1 worker", 1, one)]
        if "sferp_w2" in v:
            pts.append(("-w 2 (threads)", 2, v["sferp_w2"]["events_per_s"]))
        if "sferp_2p" in v:
            pts.append(("2 processes", 2, v["sferp_2p"]["events_per_s"]))
        fig, ax = plt.subplots(figsize=(6, 4))
        labels = [p[0] for p in pts]
        ax.bar(labels, [p[2] for p in pts], color=["#2b6cb0", "#90cdf4", "#2c5282"][: len(pts)])
        ax.scatter(
            labels,
            [one * p[1] for p in pts],
            marker="_",
            s=900,
            color="black",
            label="ideal (1 worker x workers)",
            zorder=3,
        )
        ax.axhline(one * 1.4, color="#c05621", linestyle=":", linewidth=1, label="target 1.4x")
        for i, p in enumerate(pts):
            ax.text(i, p[2], f"{p[2] / one:.2f}x", ha="center", va="bottom", fontsize=9)
        ax.set_ylabel("events/s")
        ax.set_title("Scaling on this machine (broker on the same cores)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out_dir / f"{name}-scaling.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)

    lat = r.get("latency", {})
    if lat:
        fig, ax = plt.subplots(figsize=(6, 4))
        qs = ("p50_s", "p95_s", "p99_s")
        width = 0.25
        loads = list(lat.values())
        cap = max([x.get("drain_timeout_s") or 0 for x in loads] + [2.5])
        for j, q in enumerate(qs):
            vals = [x[q] if x[q] is not None else cap for x in loads]
            xs = [i + (j - 1) * width for i in range(len(loads))]
            ax.bar(xs, vals, width, label=q[:3])
            for xx, x, val in zip(xs, loads, vals, strict=True):
                ax.text(
                    xx,
                    val,
                    f"{val:.2f}" if x[q] is not None else ">",
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
        ax.axhline(2.0, color="#c05621", linestyle=":", linewidth=1, label="target p99 2 s")
        ax.set_xticks(range(len(loads)))
        ax.set_xticklabels(
            [
                f"{x['load_fraction']:.0%} load\n{(x.get('achieved_rate') or 0):,.0f}/s"
                for x in loads
            ]
        )
        ax.set_ylabel("end-to-end latency, s")
        ax.set_title("Latency under steady load (1 worker)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out_dir / f"{name}-latency.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths
