"""Render the Grafana dashboard (grafana/dashboards/sferp.json) to a PNG from real metrics.

Grafana is not needed: this script runs the whole system for a couple of minutes
(embedded broker, waves of generated Salesforce and ERP traffic, a live
`sferp run` serving /metrics, and a real Prometheus scraping it with the alert
rules loaded), then evaluates every panel's own PromQL through Prometheus's
HTTP API and draws the panels where the dashboard puts them, with matplotlib.

    .venv/bin/pip install -e '.[docs]'          # matplotlib
    apt-get install prometheus                   # the Prometheus server (Debian)
    .venv/bin/python monitoring/render_dashboard.py --out docs/dashboard.png

One wave carries 8 % malformed messages, so the error-rate panel crosses its
5 % threshold once. Event times of each wave end at the wall clock, so the
sync lag panel shows real seconds, not the generator's fixed calendar.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
DASHBOARD = HERE / "grafana" / "dashboards" / "sferp.json"
RATE_INTERVAL = "10s"  # what Grafana's $__rate_interval becomes at a 2 s scrape interval
SCRAPE_S = 2


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prom_range(base: str, expr: str, start: float, end: float) -> list[dict]:
    """Evaluate `expr` over [start, end] through Prometheus's query_range API."""
    q = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": f"{SCRAPE_S}s"})
    with urllib.request.urlopen(f"{base}/api/v1/query_range?{q}", timeout=30) as r:
        body = json.loads(r.read())
    if body["status"] != "success":
        raise RuntimeError(f"{expr}: {body}")
    return body["data"]["result"]


def legend(fmt: str, labels: dict[str, str]) -> str:
    """Grafana's legendFormat with {{label}} placeholders filled in."""
    out = fmt
    for k, v in labels.items():
        out = out.replace("{{" + k + "}}", v)
    return out


def run_world(duration_s: float, waves: int) -> tuple[list[dict], float, float, str]:
    """Run broker, traffic, sferp and Prometheus; return (panel data, start, end, log)."""
    from sferp.broker import EmbeddedBroker
    from sferp.config import load_settings
    from sferp.generator import GeneratorConfig, produce

    prometheus = shutil.which("prometheus")
    if prometheus is None:
        raise SystemExit("the prometheus server is required (Debian: apt-get install prometheus)")
    dash = json.loads(DASHBOARD.read_text())
    work = Path(tempfile.mkdtemp(prefix="sferp-dash-"))
    metrics_port, prom_port = free_port(), free_port()
    procs: list[subprocess.Popen] = []
    with EmbeddedBroker() as broker:
        settings = load_settings(overrides={"kafka": {"bootstrap": broker.bootstrap}})
        broker.create_topics(
            {t: 3 for t in [*settings.topics.input_roles(), *settings.topics.outputs()]}
        )
        env = dict(
            os.environ,
            SFERP_METRICS__PORT=str(metrics_port),
            SFERP_METRICS__POLL_INTERVAL_S="1",
            SFERP_FLOW__SNAPSHOT_INTERVAL_S="2",
        )
        cmd = [sys.executable, "-m", "sferp", "run", "--bootstrap", broker.bootstrap]
        cmd += ["--views", str(work / "views.duckdb"), "--recovery-dir", str(work / "rec")]
        log = open(work / "sferp.log", "w")  # noqa: SIM115 - closed below
        procs.append(subprocess.Popen(cmd, env=env, stderr=log, stdout=log))
        rules = work / "alerts.yml"
        shutil.copy(HERE / "prometheus" / "alerts.yml", rules)
        (work / "prometheus.yml").write_text(
            f"global: {{scrape_interval: {SCRAPE_S}s, scrape_timeout: {SCRAPE_S}s, "
            f"evaluation_interval: {SCRAPE_S}s}}\n"
            f"rule_files: [{rules}]\n"
            "scrape_configs:\n"
            "  - job_name: sferp\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n"
        )
        procs.append(
            subprocess.Popen(
                [
                    prometheus,
                    f"--config.file={work / 'prometheus.yml'}",
                    f"--storage.tsdb.path={work / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        try:
            start = time.time()
            every = duration_s / (waves + 1)
            for i in range(waves):
                time.sleep(max(0.0, start + (i + 0.5) * every - time.time()))
                span_ms = 4 * 3600 * 1000 + 30 * 60 * 1000  # a 300-order world spans ~4.4 h
                cfg = GeneratorConfig(
                    orders=300,
                    bad=0.08 if i == waves // 2 else 0.01,
                    seed=100 + i,
                    base_time_ms=int(time.time() * 1000) - span_ms,
                )
                n = sum(produce(cfg, broker.bootstrap, create_topics=False).values())
                print(f"wave {i + 1}/{waves}: {n:,} messages", file=sys.stderr)
            time.sleep(max(0.0, start + duration_s - time.time()))
            end = time.time()
            base = f"http://127.0.0.1:{prom_port}"
            panels = []
            for p in dash["panels"]:
                if p["type"] == "row":
                    panels.append(p)
                    continue
                series = []
                for t in p["targets"]:
                    expr = t["expr"].replace("$__rate_interval", RATE_INTERVAL)
                    for r in prom_range(base, expr, start, end):
                        pts = [(float(ts), float(v)) for ts, v in r["values"]]
                        series.append((legend(t["legendFormat"], r["metric"]), pts))
                panels.append({**p, "series": series})
        finally:
            for proc in reversed(procs):
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
            log.close()
        text = (work / "sferp.log").read_text()
    shutil.rmtree(work, ignore_errors=True)
    return panels, start, end, text


def scale(unit: str) -> tuple[float, str]:
    """Multiplier and axis label of a Grafana unit."""
    return {
        "percentunit": (100.0, "%"),
        "s": (1.0, "seconds"),
        "ops": (1.0, "per second"),
    }.get(unit, (1.0, ""))


def draw(panels: list[dict], start: float, out: Path, title: str) -> None:
    """Lay the panels out on Grafana's 24-column grid and save a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.gridspec import GridSpec

    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig = plt.figure(figsize=(22, rows * 0.42), facecolor="#111217")
    grid = GridSpec(rows, 24, figure=fig, hspace=2.2, wspace=1.2)
    fig.suptitle(title, color="white", fontsize=16, x=0.125, ha="left", y=0.91)
    for p in panels:
        g = p["gridPos"]
        if p["type"] == "row":
            ax = fig.add_subplot(grid[g["y"], :])
            ax.axis("off")
            ax.text(0, 0, p["title"], color="#ccccdc", fontsize=13, weight="bold")
            continue
        ax = fig.add_subplot(grid[g["y"] + 1 : g["y"] + g["h"], g["x"] : g["x"] + g["w"]])
        ax.set_facecolor("#181b1f")
        for spine in ax.spines.values():
            spine.set_color("#2c3235")
        ax.tick_params(colors="#8e8e8e", labelsize=7)
        ax.set_title(p["title"], color="#ccccdc", fontsize=10, loc="left")
        defaults = p["fieldConfig"]["defaults"]
        mult, label = scale(defaults.get("unit", ""))
        steps = defaults.get("thresholds", {}).get("steps", [])
        if p["type"] == "stat":
            ax.set_xticks([])
            ax.set_yticks([])
            texts = []
            for name, pts in p["series"]:
                value = pts[-1][1] if pts else float("nan")
                color = "#73bf69"
                for s in steps:
                    if s["value"] is not None and value >= s["value"]:
                        color = {"red": "#f2495c", "orange": "#ff9830", "green": "#73bf69"}[
                            s["color"]
                        ]
                shown = f"{value * mult:.1f} %" if label == "%" else f"{value:,.0f}"
                texts.append((name, shown, color))
            for i, (name, shown, color) in enumerate(texts):
                y = 1 - (i + 0.5) / max(1, len(texts))
                ax.text(0.5, y + 0.08, shown, color=color, fontsize=20, ha="center", va="center")
                ax.text(0.5, y - 0.16, name, color="#ccccdc", fontsize=8, ha="center")
            continue
        for name, pts in p["series"]:
            xs = [(t - start) / 60 for t, _ in pts]
            ys = [v * mult for _, v in pts]
            ax.plot(xs, ys, linewidth=1.2, label=name)
        for s in steps:
            if s["value"] is not None and s["color"] == "red":
                ax.axhline(s["value"] * mult, color="#f2495c", linestyle="--", linewidth=0.8)
        ax.set_xlabel("minutes", color="#8e8e8e", fontsize=7)
        if label:
            ax.set_ylabel(label, color="#8e8e8e", fontsize=7)
        if p["series"] and len(p["series"]) <= 8:
            ax.legend(fontsize=6, loc="upper left", facecolor="#181b1f", labelcolor="#ccccdc")
        elif not p["series"]:
            ax.text(0.5, 0.5, "no data", color="#8e8e8e", ha="center", transform=ax.transAxes)
    fig.savefig(out, dpi=80, facecolor=fig.get_facecolor(), bbox_inches="tight")


def main() -> int:
    """Run the world, render the dashboard, write the PNG."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/dashboard.png")
    ap.add_argument("--seconds", type=float, default=150.0)
    ap.add_argument("--waves", type=int, default=8)
    args = ap.parse_args()
    panels, start, _end, log = run_world(args.seconds, args.waves)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    title = json.loads(DASHBOARD.read_text())["title"]
    draw(panels, start, out, f"{title}  (rendered from a real run: {args.seconds:.0f} s)")
    print(f"wrote {out}", file=sys.stderr)
    lines = [line for line in log.splitlines() if line.strip()]
    print(f"sferp logged {len(lines)} lines:", file=sys.stderr)
    print("\n".join(lines[:40]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
