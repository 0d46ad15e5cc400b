"""Metrics, health, readiness, logs and progress of `sferp run`, against the embedded broker.

One live run (module fixture) is scraped while it works through two waves of
generated traffic, then stopped with SIGTERM; the scrapes are compared with
what was produced and with the views the run committed. The alert rules and the
dashboard are checked against the same scrapes, and with promtool.
"""

from __future__ import annotations

import json
import logging
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from pathlib import Path

import duckdb
import orjson
import pytest
import yaml
from clusterkit import free_port
from prometheus_client.parser import text_string_to_metric_families
from sferp.connectors import sf_stats
from sferp.operators.decode import DecodeConfig, decode_batch

from sferp.config import load_settings
from sferp.demo import generated_messages
from sferp.generator import GeneratorConfig, produce
from sferp.logfmt import JsonFormatter
from sferp.metrics import Monitor, progress_line
from sferp.stage_time import STAGES

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "monitoring"
ROLES = ("sf_cdc", "erp_items", "erp_inventory", "erp_sales_orders")
OUTPUTS = ("out_inventory", "out_orders", "out_exceptions", "dlq")
STATS = {
    "consumed": "sferp_events_consumed_total",
    "applied": "sferp_events_applied_total",
    "duplicates": "sferp_events_duplicate_total",
    "late": "sferp_events_late_total",
    "dead_lettered": "sferp_events_dead_lettered_total",
    "ignored": "sferp_events_ignored_total",
}
SECRET = "do-not-log-" + uuid.uuid4().hex


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:  # not listening (yet)
        return 0, ""


def parse(text: str) -> dict[tuple[str, tuple], float]:
    """Scrape text -> {(sample name, sorted labels): value}."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def by(samples: dict, name: str, label: str) -> dict[str, float]:
    return {dict(k[1])[label]: v for k, v in samples.items() if k[0] == name}


def total(samples: dict, name: str) -> float:
    return sum(v for k, v in samples.items() if k[0] == name)


def wait_for(predicate, timeout=90.0, every=0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not met in time")


def query(views: Path, sql: str) -> list[dict]:
    r = subprocess.run(
        [sys.executable, "-m", "sferp", "query", sql, "--views", str(views), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def make_world(broker, tmp: Path) -> tuple[dict[str, str], Path]:
    suffix = uuid.uuid4().hex[:12]
    names = {role: f"{role}.{suffix}" for role in ROLES + OUTPUTS}
    broker.create_topics({names[r]: (3 if r in ROLES else 1) for r in ROLES + OUTPUTS})
    config = tmp / "sferp.toml"
    config.write_text("[topics]\n" + "".join(f'{r} = "{n}"\n' for r, n in names.items()))
    return names, config


def gen(names, orders, seed, **kw) -> GeneratorConfig:
    return GeneratorConfig(
        orders=orders,
        duplicates=0.05,
        disorder=0.2,
        bad=kw.get("bad", 0.02),
        partitions=3,
        seed=seed,
        topics={r: names[r] for r in ROLES},
    )


def produced_per_topic(cfg: GeneratorConfig) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for m in generated_messages(cfg):
        counts[m.topic] += 1
    return dict(counts)


def newest_event_times(cfgs: list[GeneratorConfig], names) -> dict[str, float]:
    """Largest event time per topic of the events that were not dead-lettered (seconds)."""
    roles = {
        names["sf_cdc"]: "salesforce",
        names["erp_items"]: "items",
        names["erp_inventory"]: "inventory",
        names["erp_sales_orders"]: "sales_orders",
    }
    newest: dict[str, int] = {}
    for cfg in cfgs:
        for o in decode_batch(generated_messages(cfg), DecodeConfig(topics=roles)):
            t = getattr(o, "event_time", None)
            if t is not None and t > newest.get(o.topic, -1):
                newest[o.topic] = t
    return {topic: ms / 1000 for topic, ms in newest.items()}


def start_run(config: Path, broker, views: Path, recovery: Path, port: int, *extra: str, env=None):
    env = dict(
        os.environ,
        SFERP_METRICS__PORT=str(port),
        SFERP_METRICS__POLL_INTERVAL_S="1",
        SFERP_FLOW__SNAPSHOT_INTERVAL_S="1",
        SFERP_SALESFORCE__PASSWORD=SECRET,  # unused without Salesforce; must never be logged
    ) | (env or {})
    cmd = [sys.executable, "-m", "sferp", "run", "--config", str(config)]
    cmd += ["--bootstrap", broker.bootstrap, "--views", str(views)]
    cmd += ["--recovery-dir", str(recovery), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture(scope="module")
def live(broker, tmp_path_factory):
    """A live run scraped during and after two waves of traffic, then stopped by SIGTERM."""
    tmp = tmp_path_factory.mktemp("live")
    names, config = make_world(broker, tmp)
    views, port = tmp / "views.duckdb", free_port()
    base = f"http://127.0.0.1:{port}"
    first = gen(names, 300, seed=41)
    produce(first, broker.bootstrap, create_topics=False)
    n_first = produced_per_topic(first)
    proc = start_run(config, broker, views, tmp / "recovery", port, "--log-format", "json")
    out: dict = {"names": names, "views": views, "base": base}
    try:
        wait_for(lambda: http_get(base + "/healthz")[0] == 200 if proc.poll() is None else 1)
        assert proc.poll() is None, proc.stderr.read()[-3000:]

        def consumed_is(n):
            samples = parse(http_get(base + "/metrics")[1])
            return samples if total(samples, STATS["consumed"]) == n else None

        out["during"] = wait_for(lambda: consumed_is(sum(n_first.values())))
        out["produced_first"] = n_first
        second = gen(names, 200, seed=42)
        produce(second, broker.bootstrap, create_topics=False)
        n_second = produced_per_topic(second)
        out["produced"] = {t: n_first[t] + n_second.get(t, 0) for t in n_first}
        out["newest"] = newest_event_times([first, second], names)
        wait_for(lambda: consumed_is(sum(out["produced"].values())))
        # everything is read: wait for /readyz and for the view numbers to settle
        out["readyz"] = wait_for(lambda: (s := http_get(base + "/readyz"))[0] == 200 and s)
        time.sleep(1.5)
        out["after_text"] = http_get(base + "/metrics")[1]
        out["after_at"] = time.time()
        out["after"] = parse(out["after_text"])
        out["flow_stats"] = query(views, "SELECT * FROM flow_stats")
        out["dead"] = query(
            views, "SELECT topic, reason, count(*) AS n FROM dead_letters GROUP BY ALL"
        )
        out["counts"] = query(
            views,
            "SELECT (SELECT count(*) FROM records) AS records, "
            "(SELECT count(*) FROM order_status) AS order_status, "
            "(SELECT count(*) FROM inventory_live) AS inventory_live, "
            "(SELECT count(*) FROM order_status WHERE quote_to_cash_s IS NOT NULL) AS q2c",
        )[0]
        out["exceptions"] = query(
            views,
            "SELECT kind, count(*) AS n FROM reconciliation_exceptions WHERE open GROUP BY kind",
        )
        out["stages"] = query(views, "SELECT stage, count(*) AS n FROM order_status GROUP BY 1")
        out["orders"] = query(
            views, "SELECT sf_order_id, sf_status, erp_order_no, amount_matches FROM order_status"
        )
        out["overdue"] = query(
            views,
            "SELECT key FROM reconciliation_exceptions WHERE open AND kind = 'HANDOFF_OVERDUE'",
        )
        proc.send_signal(signal.SIGTERM)
        _, out["stderr"] = proc.communicate(timeout=60)
        out["returncode"] = proc.returncode
        with duckdb.connect(str(views), read_only=True) as con:
            cur = con.execute("SELECT * FROM flow_stats")
            cols = [d[0] for d in cur.description]
            out["final"] = {row[0]: dict(zip(cols, row, strict=True)) for row in cur.fetchall()}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return out


def test_scrapes_agree_with_what_was_produced_and_with_flow_stats(live):
    assert live["returncode"] == 0, live["stderr"][-3000:]
    # while running, after the first wave
    during = live["during"]
    for topic, n in live["produced_first"].items():
        assert by(during, STATS["consumed"], "topic")[topic] == n
    assert total(during, "sferp_up") == 1

    after = live["after"]
    fs = {row["topic"]: row for row in live["flow_stats"]}
    assert set(fs) == set(live["produced"])
    for topic, n in live["produced"].items():
        assert fs[topic]["consumed"] == n
        for column, metric in STATS.items():
            assert by(after, metric, "topic")[topic] == fs[topic][column], (topic, column)
        read = sum(
            v
            for k, v in after.items()
            if k[0] == "sferp_source_messages_total" and dict(k[1])["topic"] == topic
        )
        assert read == n
    assert total(after, STATS["dead_lettered"]) > 0
    dead = {
        (dict(k[1])["topic"], dict(k[1])["reason"]): v
        for k, v in after.items()
        if k[0] == "sferp_dead_letters_total"
    }
    assert dead == {(r["topic"], r["reason"]): r["n"] for r in live["dead"]}

    # the last scrape equals the views the run left behind after its clean stop
    assert set(live["final"]) == set(live["produced"])
    for topic, row in live["final"].items():
        for column, metric in STATS.items():
            assert by(after, metric, "topic")[topic] == row[column], (topic, column)

    rows = by(after, "sferp_view_rows", "view")
    for view in ("records", "order_status", "inventory_live"):
        assert rows[view] == live["counts"][view]
    assert by(after, "sferp_exceptions_open", "kind") == {
        **{k: 0 for k in by(after, "sferp_exceptions_open", "kind")},
        **{r["kind"]: r["n"] for r in live["exceptions"]},
    }
    stages = by(after, "sferp_orders", "stage")
    assert {s: n for s, n in stages.items() if n} == {r["stage"]: r["n"] for r in live["stages"]}
    assert total(after, "sferp_quote_to_cash_seconds_count") == live["counts"]["q2c"] > 0


def test_worker_busy_time_per_stage_is_served_and_logged(live):
    """Every stage of the one worker is served; the stages that handle every message
    took time, and in all no more than the wall clock since the start."""
    after = live["after"]
    busy = {
        (dict(k[1])["worker"], dict(k[1])["stage"]): v
        for k, v in after.items()
        if k[0] == "sferp_worker_busy_seconds_total"
    }
    assert {w for w, _ in busy} == {"0"}
    assert {s for _, s in busy} == set(STAGES)
    for stage in ("read", "decode", "merge", "orders", "coordinator", "views", "kafka_out"):
        assert busy[("0", stage)] > 0, stage
    assert sum(busy.values()) < live["after_at"] - total(after, "sferp_start_time_seconds")
    closing = [
        json.loads(line)["message"]
        for line in live["stderr"].splitlines()
        if "worker time by stage" in line
    ]
    assert len(closing) == 1 and re.search(r"merge \d+ %.*\(busy \d+ % of [\d.]+ s\)", closing[0])


def test_order_gauges_of_the_business_alerts_equal_the_views(live):
    """The numbers behind SferpSyncFailureHigh and SferpQuoteAccuracyLow, counted here
    from the order_status rows themselves."""
    after = live["after"]
    orders = live["orders"]
    overdue = {r["key"] for r in live["overdue"]}
    activated = [o for o in orders if o["sf_status"] == "Activated"]
    out_of_sync = [
        o for o in activated if o["amount_matches"] is False or o["sf_order_id"] in overdue
    ]
    linked: dict[str, int] = {}
    for o in orders:
        if o["erp_order_no"] is not None:
            key = {True: "true", False: "false", None: "unknown"}[o["amount_matches"]]
            linked[key] = linked.get(key, 0) + 1
    assert activated and out_of_sync and linked.get("false")  # the world has all three
    assert total(after, "sferp_orders_activated") == len(activated)
    assert total(after, "sferp_orders_out_of_sync") == len(out_of_sync)
    assert by(after, "sferp_orders_linked", "amount_matches") == linked


def test_lag_commit_latency_and_readiness(live):
    after = live["after"]
    assert total(after, "sferp_ready") == 1
    assert "caught up" in live["readyz"][1]
    lags = [v for k, v in after.items() if k[0] == "sferp_consumer_lag_messages"]
    assert len(lags) == 12 and max(lags) == 0
    positions = {
        (dict(k[1])["topic"], dict(k[1])["partition"]): v
        for k, v in after.items()
        if k[0] == "sferp_consumer_position"
    }
    per_topic: dict[str, float] = defaultdict(float)
    for (topic, _), v in positions.items():
        per_topic[topic] += v  # offsets start at 0: positions sum to the messages read
    assert dict(per_topic) == live["produced"]
    # event lag: the newest event time of each topic, and wall clock minus it
    newest = by(after, "sferp_last_event_timestamp_seconds", "topic")
    assert newest == pytest.approx(live["newest"], abs=0.001)
    lag = by(after, "sferp_event_lag_seconds", "topic")
    for topic, t in newest.items():
        # scraped a few seconds ago: at most that much below wall clock minus event time now
        assert 0 <= (time.time() - t) - lag[topic] <= 120
    # every consumed batch reached a commit: at least one per partition, within seconds
    count = total(after, "sferp_view_commit_seconds_count")
    assert 12 <= count <= sum(live["produced"].values())
    assert 0 < total(after, "sferp_view_commit_seconds_sum") / count < 10
    assert total(after, "sferp_view_commit_seconds_bucket") > 0


def test_logs_are_one_json_object_per_line_with_the_notable_events(live):
    lines = live["stderr"].splitlines()
    docs = [json.loads(line) for line in lines]  # every line is JSON
    messages = [d["message"] for d in docs]
    assert all({"time", "level", "logger", "message"} <= set(d) for d in docs)
    assert any(m.startswith("metrics on http://127.0.0.1:") for m in messages)
    assert any(m.startswith("reading 12 input partitions:") for m in messages)
    assert any(m.startswith("snapshot taken") for m in messages)
    assert any("new dead letters since the last report" in m for m in messages)
    assert messages[-1] == "stopped"
    # one line per notable event, never one per message
    assert len(lines) < 40, messages
    assert SECRET not in live["stderr"]


def promql_metrics(expr: str) -> set[str]:
    """Metric names in a PromQL expression (ours are all `sferp_*`; `up` is Prometheus's)."""
    return set(re.findall(r"\b(sferp_[a-z0-9_]+|up)\b(?!\s*\()", expr))


def rule_exprs() -> list[str]:
    doc = yaml.safe_load((MONITORING / "prometheus" / "alerts.yml").read_text())
    return [r["expr"] for g in doc["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    doc = json.loads((MONITORING / "grafana" / "dashboards" / "sferp.json").read_text())
    return [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]


def test_every_metric_of_the_dashboard_and_the_alerts_is_exported(live, monkeypatch):
    exported = {k[0] for k in live["after"]}
    assert not [n for n in exported if n.endswith("_created")]  # only documented series
    labels: dict[str, set[str]] = defaultdict(set)
    for name, lbls in live["after"]:
        labels[name].update(k for k, _ in lbls)
    # The Salesforce API metrics exist only in a process with a Salesforce client
    # (tests/salesforce/test_sf_metrics.py scrapes them from real calls).
    stats = sf_stats.ApiStats(lambda: sf_stats.GateReading(False, 0.5, False))
    stats.record("query", 0.1, "TIMEOUT")
    writeback = type("W", (), {"written": 1, "failed": {"UNSENT": 1}, "pending": {}})()
    monkeypatch.setattr(sf_stats, "_LAST_POLL", {"Order": 1.0})
    for fam in sf_stats.families([stats], [writeback]):
        for sample in fam.samples:
            exported.add(sample.name)
            labels[sample.name].update(sample.labels)
    exprs = rule_exprs() + dashboard_exprs()
    assert len(rule_exprs()) >= 10 and len(dashboard_exprs()) >= 15
    used: set[str] = set()
    for expr in exprs:
        used |= promql_metrics(expr)
        # label matchers name labels the metric has
        for name, matchers in re.findall(r"\b(sferp_[a-z0-9_]+)\{([^}]*)\}", expr):
            for label in re.findall(r"([a-z_]+)\s*=~?", matchers):
                assert label in labels[name], (name, label)
    assert "sferp_view_commit_seconds_bucket" in used
    missing = {m for m in used if m != "up"} - exported
    assert not missing, f"referenced but not exported: {sorted(missing)}"
    # grouping labels exist on the metrics they group
    for expr in exprs:
        for group in re.findall(r"by \(([a-z_, ]+)\)", expr):
            for label in (g.strip() for g in group.split(",")):
                if label == "le" or label == "instance":
                    continue
                assert any(label in labels[m] for m in promql_metrics(expr) if m in labels), (
                    expr,
                    label,
                )


def test_alert_rules_with_promtool():
    promtool = _tool("promtool", "prometheus")
    prom = MONITORING / "prometheus"
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]):
        r = subprocess.run([promtool, *args], cwd=prom, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(
        [promtool, "check", "config", "prometheus.yml"], cwd=prom, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing in CI: .ci/run installs the Debian package {package}")
        pytest.skip(f"{name} not installed (apt-get install {package}); CI always runs this")
    return path


def test_alertmanager_routes_every_alert_to_its_team():
    """Critical alerts page the team their `team` label names, warnings open a ticket,
    and a critical business alert also reaches the integration team."""
    amtool = _tool("amtool", "prometheus-alertmanager")
    config = MONITORING / "alertmanager" / "alertmanager.yml"
    r = subprocess.run([amtool, "check-config", str(config)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = yaml.safe_load((MONITORING / "prometheus" / "alerts.yml").read_text())
    rules = [rule for group in doc["groups"] for rule in group["rules"]]
    assert {rule["labels"]["team"] for rule in rules} == {"integration", "order-operations"}
    for rule in rules:
        labels = rule["labels"]
        r = subprocess.run(
            [amtool, "config", "routes", "test", f"--config.file={config}"]
            + [f"{k}={v}" for k, v in sorted(labels.items())]
            + [f"alertname={rule['alert']}"],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        urgency = "page" if labels["severity"] == "critical" else "ticket"
        expected = [f"{labels['team']}-{urgency}"]
        if labels["severity"] == "critical" and labels["team"] != "integration":
            expected.append("integration-ticket")
        assert r.stdout.strip().split(",") == expected, rule["alert"]
    for prometheus_yml in (MONITORING / "prometheus", ROOT / "deploy" / "prometheus"):
        prom = yaml.safe_load((prometheus_yml / "prometheus.yml").read_text())
        targets = [t for am in prom["alerting"]["alertmanagers"] for sc in am["static_configs"]
                   for t in sc["targets"]]  # fmt: skip
        assert targets == ["alertmanager:9093"]


def test_alerts_are_labelled_technical_or_business():
    doc = yaml.safe_load((MONITORING / "prometheus" / "alerts.yml").read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    categories = {r["labels"]["category"] for r in rules}
    assert categories == {"technical", "business"}
    for r in rules:
        assert r["labels"]["severity"] in ("critical", "warning"), r["alert"]
        assert r["labels"]["team"], r["alert"]
        assert r["annotations"]["summary"], r["alert"]
    readme = (ROOT / "README.md").read_text()
    for r in rules:
        assert f"`{r['alert']}`" in readme, f"README does not say what to do for {r['alert']}"


def test_readiness_follows_the_consumer_lag(broker, topics):
    names = topics({"sf_cdc": 1})
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
    for _ in range(10):
        producer.send(names["sf_cdc"], key=b"k", value=b"{}", partition=0)
        producer.flush()  # one batch each: Tansu reports the end exactly
    producer.close()
    settings = load_settings(
        overrides={
            "kafka": {"bootstrap": broker.bootstrap},
            "topics": {"sf_cdc": names["sf_cdc"]},
            "metrics": {"ready_max_lag": 3},
        }
    )
    positions = {(names["sf_cdc"], 0): 0}
    m = Monitor(settings, views_path="unused", writer=False, positions=lambda: dict(positions))
    assert m.readiness() == (False, "end offsets of the input partitions unknown")
    m._poll_lag()
    ready, reason = m.readiness()
    assert not ready and reason.startswith(f"behind: 10 messages on {names['sf_cdc']}[0]")
    assert m.lags() == {(names["sf_cdc"], 0): 10}
    positions[(names["sf_cdc"], 0)] = 7
    assert m.readiness() == (True, "caught up: at most 3 messages behind")
    samples = parse(_scrape(m))
    assert by(samples, "sferp_consumer_lag_messages", "partition") == {"0": 3}
    assert total(samples, "sferp_ready") == 1


def _scrape(m: Monitor) -> str:
    from prometheus_client import generate_latest

    return generate_latest(m.registry).decode()


def test_json_log_lines_escape_what_they_carry():
    fmt = JsonFormatter()
    text = 'quote " backslash \\ newline \n tab \t control \x01 unicode é'
    record = logging.LogRecord("sferp", logging.WARNING, __file__, 1, "%s", (text,), None)
    line = fmt.format(record)
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["message"] == text and doc["level"] == "WARNING" and doc["logger"] == "sferp"
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "sferp", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    doc = json.loads(fmt.format(record))
    assert "ValueError: boom" in doc["exception"]


def test_progress_line_text():
    assert progress_line(500, 2000, 250.0, 2.0, final=False) == (
        "progress: 500 of 2,000 events (25.0 %), 250 events/s, ETA 6 s"
    )
    assert progress_line(2000, 2000, 1000.0, 2.0, final=True) == (
        "caught up: 2,000 of 2,000 events (100.0 %), 1,000 events/s, 2.0 s"
    )


def test_bounded_run_shows_progress_on_a_terminal_only(broker, tmp_path):
    names, config = make_world(broker, tmp_path)
    cfg = gen(names, 300, seed=43)
    n = sum(produce(cfg, broker.bootstrap, create_topics=False).values())
    cmd = [sys.executable, "-m", "sferp", "run", "--config", str(config), "--bootstrap"]
    cmd += [broker.bootstrap, "--until-caught-up", "--views", str(tmp_path / "v.duckdb")]
    env = dict(os.environ, SFERP_METRICS__PORT="0")
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=env
    )
    os.close(slave)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 60)
            if not ready:
                break
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        proc.wait(timeout=60)
    err = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, err[-3000:]
    assert f"caught up: {n:,} of {n:,} events (100.0 %)" in err
    # not a terminal: no progress text at all
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "events/s" not in r.stderr and "\r" not in r.stderr


def test_view_counters_never_go_down_across_a_crash(broker, tmp_path):
    """Killed before its first snapshot, a run restarts from scratch and replays:
    the counters hold what the crashed run committed instead of dropping to zero."""
    names, config = make_world(broker, tmp_path)
    cfg = gen(names, 300, seed=44)
    produce(cfg, broker.bootstrap, create_topics=False)
    produced = produced_per_topic(cfg)
    views, recovery, port = tmp_path / "views.duckdb", tmp_path / "recovery", free_port()
    base = f"http://127.0.0.1:{port}"

    def counters() -> dict:
        status, text = http_get(base + "/metrics")
        if status != 200:
            return {}
        s = parse(text)
        return {
            k: v
            for k, v in s.items()
            if k[0] in STATS.values() or k[0] == "sferp_dead_letters_total"
        }

    def caught_up():
        c = counters()
        consumed = sum(v for k, v in c.items() if k[0] == STATS["consumed"])
        return c if consumed == sum(produced.values()) else None

    first = start_run(
        config, broker, views, recovery, port, env={"SFERP_FLOW__SNAPSHOT_INTERVAL_S": "60"}
    )
    try:
        before = wait_for(caught_up)
    finally:
        first.kill()  # SIGKILL: no flush, no snapshot
        first.communicate()
    assert sum(v for k, v in before.items() if k[0] == "sferp_dead_letters_total") > 0

    second = start_run(config, broker, views, recovery, port)
    try:
        seen = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            c = counters()
            if c:
                seen.append(c)
                if c == before and len(seen) > 3:
                    break
            time.sleep(0.1)
        assert seen, "the restarted run never served /metrics"
        for c in seen:  # from the first scrape on, nothing below the crashed run's totals
            for key, value in before.items():
                assert c.get(key, -1) >= value, (key, c.get(key), value)

        # The replay commits after the counters already show the crashed run's totals
        # (they are floored by them): wait for the views to catch up, then compare.
        def replayed():
            fs = query(views, "SELECT * FROM flow_stats")
            c = counters()
            done = {row["topic"] for row in fs} == set(produced) and all(
                c.get((metric, (("topic", row["topic"]),))) == row[column]
                for row in fs
                for column, metric in STATS.items()
                if column != "late"  # late may differ between runs (CONTRACT §2)
            )
            return (fs, c) if done else None

        fs, last = wait_for(replayed)
        assert last == before
        assert {row["topic"]: row["consumed"] for row in fs} == {
            t: before[(STATS["consumed"], (("topic", t),))] for t in produced
        }
        second.send_signal(signal.SIGTERM)
        _, err = second.communicate(timeout=60)
        assert second.returncode == 0, err[-3000:]
    finally:
        if second.poll() is None:
            second.kill()
            second.communicate()


def test_views_writer_accepts_a_table_without_rows(tmp_path):
    """A delta may name a table with no rows (the coordinator does); the writer skips it.

    Found by the dashboard run: such a delta reaching a commit alone failed it.
    """
    from sferp.connectors.duckdb_views import write_views_file

    path = str(tmp_path / "v.duckdb")
    write_views_file(path, [{"records": {}}, {"flow_stats": {("t",): ("t", 1, 1, 0, 0, 0, 0)}}])
    write_views_file(path, [{"records": {}, "order_status": {}}])  # nothing else at all
    with duckdb.connect(path, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM flow_stats").fetchone() == (0,)


def test_every_process_serves_the_contract_metric_names():
    """CONTRACT §5: each process serves the five names; only the views' owner has
    samples of the view totals (a sum over the cluster counts each message once)."""
    settings = load_settings(overrides={})
    text = _scrape(Monitor(settings, views_path="unused", writer=False, process_id=1))
    names = {fam.name: fam for fam in text_string_to_metric_families(text)}
    for name in (
        "sferp_events_consumed",
        "sferp_events_duplicate",
        "sferp_events_late",
        "sferp_dead_letters",
        "sferp_event_lag_seconds",
        "sferp_view_commit_seconds",
    ):
        assert name in names, name
    for name in ("sferp_events_consumed", "sferp_events_duplicate", "sferp_dead_letters"):
        assert f"# TYPE {name}_total counter" in text
        assert names[name].samples == []


def test_view_numbers_that_cannot_be_read_still_show_their_age_and_errors(tmp_path, caplog):
    """With the views unreadable the business gauges are missing, so nothing would
    alert on them: the refresh age and errors (SferpViewNumbersStale) must remain."""
    import http.server
    import threading

    from sferp.connectors.query_server import endpoint_path

    class Failing(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers["Content-Length"]))
            body = b'{"error": "the views file is broken"}'
            self.send_response(500)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    views = tmp_path / "views.duckdb"
    Path(endpoint_path(str(views))).write_bytes(
        orjson.dumps(
            {"pid": os.getpid(), "host": "127.0.0.1", "port": server.server_port, "token": "t"}
        )
    )
    try:
        m = Monitor(load_settings(overrides={}), views_path=str(views), writer=True)
        with caplog.at_level(logging.INFO, logger="sferp.metrics"):
            m._maybe_refresh()
            m._next_refresh = 0.0
            m._maybe_refresh()  # a second failure: counted, not logged again
        text = _scrape(m)
    finally:
        server.shutdown()
    names = {fam.name: fam for fam in text_string_to_metric_families(text)}
    assert "sferp_orders" not in names and "sferp_exceptions_open" not in names
    assert names["sferp_views_refresh_errors"].samples[0].value == 2
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "the views file is broken" in warned[0], warned
    assert names["sferp_views_refresh_age_seconds"].samples[0].value >= 0
