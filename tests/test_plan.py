"""`sferp plan`: sizing from benchmark results (synthetic results files, real CLI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sferp.benchmarks.plan import find_results, parallel_fraction, plan, render, speedup
from sferp.benchmarks.report import evaluate_targets


def results(one=10_000.0, two=18_000.0, mode="full", started="2026-11-28T10:00:00+00:00"):
    return {
        "mode": mode,
        "started_at": started,
        "machine": {"cores": 2, "cpu_model": "Test CPU"},
        "variants": {
            "raw_floor": {"events_per_s": 25_000.0},
            "textbook": {"events_per_s": 6_000.0},
            "sferp_1w": {"events_per_s": one, "broker_cpu_s": 1.0},
            "sferp_2p": {"events_per_s": two, "broker_cpu_s": 1.5, "other_cpu_s": 0.0},
        },
        "latency": {
            "load_50": {"load_fraction": 0.5, "p50_s": 0.4, "p99_s": 1.0},
            "load_80": {"load_fraction": 0.8, "p50_s": 0.7, "p99_s": 1.6},
        },
    }


def test_amdahl_fit_reproduces_the_measured_speedup():
    p = parallel_fraction(1.8)
    assert speedup(1, p) == pytest.approx(1.0)
    assert speedup(2, p) == pytest.approx(1.8)
    assert parallel_fraction(0.9) == 0.0  # no gain measured: no parallel part
    assert parallel_fraction(2.0) == pytest.approx(1.0)


def test_plan_picks_the_fewest_processes_within_the_load_limit():
    r = results()
    pl = plan(r, 50_000, 0.7)
    n = pl["processes"]
    p = pl["parallel_fraction"]
    assert 10_000 * speedup(n, p) * 0.7 >= 50_000
    assert 10_000 * speedup(n - 1, p) * 0.7 < 50_000
    assert pl["load_per_process"] <= 0.7
    # One process is enough while the peak stays under 70 % of its capacity.
    assert plan(r, 7_000, 0.7)["processes"] == 1
    assert plan(r, 7_001, 0.7)["processes"] == 2


def test_latency_is_interpolated_between_the_measured_loads():
    pl = plan(results(two=20_000.0), 6_500, 1.0)  # 1 process at 65 % load
    assert pl["processes"] == 1 and pl["load_per_process"] == pytest.approx(0.65)
    assert pl["p50_s"] == pytest.approx(0.55)
    assert pl["p99_s"] == pytest.approx(1.3)
    low = plan(results(), 1_000, 0.7)  # below the lowest measured load: that load's values
    assert low["p99_s"] == pytest.approx(1.0)


def _with_commit_p99(r, p99_50, p99_80):
    r["latency"]["load_50"]["flow_commit_histogram"] = {"p99_le_s": p99_50}
    r["latency"]["load_80"]["flow_commit_histogram"] = {"p99_le_s": p99_80}
    return r


@pytest.mark.parametrize(
    "peak, p99s, says",
    [
        (6_500, (1.0, 3.0), None),  # 65 % load: 2.0 s, the threshold itself (quiet)
        (7_000, (1.0, 3.0), "warning: the consume-to-commit p99 is up to 2.3 s at this load"),
        (2_000, (2.5, 5.0), "note: the consume-to-commit p99 was up to 2.5 s at 50% load"),
        (2_000, (1.5, 5.0), None),
    ],
)
def test_plan_says_when_the_commit_alert_would_fire_at_the_planned_load(peak, p99s, says):
    """SferpViewCommitSlow fires at a p99 above 2 s: the plan must not call such a load safe
    without saying so (above the lowest measured load a warning, below it a note)."""
    r = _with_commit_p99(results(), *p99s)
    text = render(plan(r, peak, 1.0), r, Path("r.json"))
    if says is None:
        assert "SferpViewCommitSlow" not in text
    else:
        assert says in text and "SferpViewCommitSlow" in text


def test_a_peak_beyond_the_scaling_ceiling_is_reported_not_hidden():
    pl = plan(results(two=10_000.0), 50_000, 0.7)  # a 2nd process gained nothing
    assert pl["processes"] is None
    assert pl["ceiling_at_max_load"] == pytest.approx(7_000)


def _plan_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "sferp", "plan", *args], capture_output=True, text=True, timeout=60
    )


def test_cli_answers_and_states_its_assumptions(tmp_path):
    f = tmp_path / "r.json"
    f.write_text(json.dumps(results()))
    r = _plan_cli("--peak", "50000", "--results", str(f))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    n = plan(results(), 50_000, 0.7)["processes"]
    assert lines[0].startswith(f"peak 50,000 events/s: {n} worker processes")
    assert "p99 about" in lines[1]
    assert sum(line.startswith("assumes:") for line in lines) == 2


@pytest.mark.parametrize(
    ("args", "word"),
    [
        (["--peak", "0"], "--peak"),
        (["--peak", "100", "--max-load", "1.5"], "--max-load"),
        (["--peak", "100", "--results", "/nonexistent/r.json"], "--results"),
        ([], "--peak"),
    ],
)
def test_cli_bad_usage_exits_2_with_one_line(args, word):
    r = _plan_cli(*args)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and word in r.stderr


@pytest.mark.parametrize(
    ("content", "says"),
    [("{}", "has no 1-worker result"), ("not json", "is not JSON"), ('{"variants": 5}', "has no")],
)
def test_a_file_that_is_no_results_file_says_what_is_missing(tmp_path, content, says):
    f = tmp_path / "r.json"
    f.write_text(content)
    r = _plan_cli("--peak", "100", "--results", str(f))
    assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_default_results_are_the_newest_full_run(tmp_path):
    assert find_results(tmp_path) is None
    (tmp_path / "reference.json").write_text(json.dumps(results()))
    assert find_results(tmp_path).name == "reference.json"
    (tmp_path / "a.json").write_text(json.dumps(results(started="2026-11-28T09:00:00+00:00")))
    (tmp_path / "b.json").write_text(json.dumps(results(started="2026-11-28T11:00:00+00:00")))
    (tmp_path / "c.json").write_text(
        json.dumps(results(mode="quick", started="2026-11-28T12:00:00+00:00"))
    )
    assert find_results(tmp_path).name == "b.json"


def test_targets_report_pass_and_fail_honestly():
    r = results()
    r["memory"] = {
        "fill_large": {
            "live_records": 1_000_000,
            "peak_rss_bytes": 1_600_000_000,
            "empty_run_peak_rss_bytes": 100_000_000,
        }
    }
    r["latency"]["load_80"].update(
        samples_counted=100,
        samples_unobserved=0,
        drain_timeout_s=30,
        achieved_rate=8000,
        produce_seconds=60,
    )
    status = {t["id"]: t["status"] for t in evaluate_targets(r)}
    assert status == {
        "floor": "PASS",  # 10,000 / 25,000 = 40 %
        "textbook": "PASS",  # 1.67x
        "scaling": "PASS",  # 1.8x
        "latency": "PASS",  # 1.6 s
        "rss": "FAIL",  # 1.6 GB
    }
    r["variants"]["sferp_2p"]["events_per_s"] = 12_000.0
    r["latency"]["load_80"]["p99_s"] = None
    status = {t["id"]: t["status"] for t in evaluate_targets(r)}
    assert status["scaling"] == "FAIL" and status["latency"] == "FAIL"
