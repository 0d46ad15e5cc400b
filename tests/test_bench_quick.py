"""Smoke test of the benchmark harness: `sferp bench --quick` end to end.

Asserts only that every variant ran over the whole stream and that the views of
every sferp run equal the reference model; the numbers themselves are not
checked (quick mode is too small for them to mean anything).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from sferp.benchmarks.workload import TopicSet, main_stream

from sferp.compare import diff, load_views
from sferp.reference import compute

VARIANTS = ("raw_floor", "textbook", "sferp_1w", "sferp_w2", "sferp_2p", "sferp_1w_recovery")
SFERP_RUNS = ("sferp_1w", "sferp_w2", "sferp_2p", "sferp_1w_recovery")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    work, out = root / "work", root / "out"
    r = subprocess.run(
        [sys.executable, "-m", "sferp", "bench", "--quick", "--workdir", str(work)]
        + ["--out", str(out), "--name", "smoke"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    results = json.loads((out / "smoke.json").read_text())
    return results, work, out, r.stdout


def test_every_variant_ran_over_the_whole_stream(quick_run):
    results, _, out, stdout = quick_run
    n = results["workload"]["messages"]
    assert results["mode"] == "quick" and results["complete"] and not results["problems"]
    assert n == results["config"]["events"]
    for name in VARIANTS:
        v = results["variants"][name]
        assert v["ok"], name
        assert v["events"] == n and v["events_per_s"] > 0, name
        assert all(p["returncode"] == 0 and p["peak_rss_bytes"] > 0 for p in v["processes"]), name
    assert len(results["variants"]["sferp_2p"]["processes"]) == 2
    # Each sferp process said where its workers' time went (its closing log line).
    for name in ("sferp_1w", "sferp_w2", "sferp_2p", "sferp_1w_recovery"):
        times = results["variants"][name]["worker_time"]
        assert len(times) == len(results["variants"][name]["processes"]), name
        assert all("merge" in t and "busy" in t for t in times), (name, times)
    # The baselines report what they read: every message of the stream.
    assert results["variants"]["raw_floor"]["counts"]["messages"] == n
    assert results["variants"]["textbook"]["counts"]["messages"] == n
    for key in ("load_50", "load_80"):
        lat = results["latency"][key]
        assert lat["flow_exit_ok"] and lat["producer_error"] is None
        assert lat["samples_counted"] > 0
        assert lat["consumed_at_end"] == lat["messages_sent"] + lat["primer_messages"]
        busy = lat["worker_busy"]  # scraped at the phase's start and end
        assert busy["stages"]["decode"] > 0 and busy["stages"]["merge"] > 0
        assert 0 < busy["total"] == pytest.approx(sum(busy["stages"].values()), abs=1e-3)
    mem = results["memory"]
    assert 0 < mem["fill_small"]["live_records"] < mem["fill_large"]["live_records"]
    assert mem["dedup"]["bytes_per_identity"] > 8  # at least the 64-bit hash itself
    assert results["recovery"]["state_bytes"] > 0
    assert {t["id"] for t in results["targets"]} == {
        "floor",
        "textbook",
        "scaling",
        "latency",
        "rss",
    }
    assert all(t["status"] in ("PASS", "FAIL", "N/A") for t in results["targets"])
    report = (out / "smoke.md").read_text()
    assert "## Targets" in report and "raw floor" in report
    assert "Where the workers' time went" in report and "worker busy by stage" in report
    assert "PASS" in stdout or "FAIL" in stdout


def test_views_of_every_sferp_run_equal_the_reference_model(quick_run):
    results, work, _, _ = quick_run
    cfg = results["config"]
    topics = TopicSet("main", cfg["partitions"])
    stream = main_stream(
        cfg["events"],
        topics,
        seed=cfg["seed"],
        duplicates=cfg["duplicates"],
        disorder=cfg["disorder"],
        bad=cfg["bad"],
    )
    expected = compute(stream.messages, topics.reference_config())
    assert len(expected.records) == results["workload"]["records_expected"]
    for name in SFERP_RUNS:
        assert diff(expected, load_views(work / f"{name}.duckdb")) == [], name
        assert results["variants"][name]["views_equal_reference"], name


def test_plan_reads_the_quick_results(quick_run):
    _, _, out, _ = quick_run
    r = subprocess.run(
        [sys.executable, "-m", "sferp", "plan", "--peak", "1000", "--results"]
        + [str(out / "smoke.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "worker process" in r.stdout and r.stdout.count("assumes:") == 2
