"""End-to-end latency under steady load: produce at a fixed rate, watch the views.

Method. Before a phase, some messages of the stream are chosen as samples
(about `per_s` a second): each is an applied change (not a duplicate, not bad,
not a gap marker) that is newer than every earlier message of the same record,
so the record's `records.version` reaches the sample's version only once the
flow has applied it (or a newer change of that record produced after it).
A producer process forked for the phase sends the stream at the fixed rate, as
requests encoded before the phase (benchmarks/rawproduce.py: the load generator
must not take the CPU the flow needs), and reports the wall-clock time just
before it sends the request carrying each sample. This process
polls the running writer's query endpoint (`sferp.query.fetch`, the same path
as `sferp query`) every `poll_s` for the versions of the outstanding samples'
records. A sample's latency is the time the answer that first shows its version
arrived minus its produce time: an upper bound of the commit-to-view time,
at most one poll interval (plus the query's own time) late.
"""

from __future__ import annotations

import math
import multiprocessing
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from sferp.events import RawMessage
from sferp.query import QueryFailed, fetch
from sferp.reference import ReferenceConfig, decode

from .rawproduce import Chunk, RawProducer, encode_chunks


@dataclass(frozen=True)
class Sample:
    """One watched message: where it is in the stream and what it makes visible."""

    index: int
    source: str
    entity: str
    record_key: str
    version: tuple[int, ...]


def _version_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(":"))
    except ValueError:
        return ()


def pick_samples(
    messages: Sequence[RawMessage],
    labels: Sequence[str],
    ref: ReferenceConfig,
    every: int,
) -> list[Sample]:
    """About one sample per `every` messages (see the module docstring for the rules)."""
    every = max(1, every)
    candidates: dict[int, Sample] = {}
    i = 0
    n = len(messages)
    while i < n:
        for j in range(i, min(i + every, n)):
            if labels[j] != "applied":
                continue
            out = decode(messages[j], ref)
            if not isinstance(out, list) or not out:
                continue
            ch = out[0]
            if ch.op == "gap":
                continue
            candidates[j] = Sample(j, ch.source, ch.entity, ch.key, tuple(ch.order))
            break
        i += every
    # Drop samples that an earlier message of the same record already covers (disorder).
    watch: dict[tuple[str, bytes | None], list[Sample]] = {}
    for s in candidates.values():
        watch.setdefault((messages[s.index].topic, messages[s.index].key), []).append(s)
    last = max(candidates, default=-1)
    best: dict[tuple[str, str, str], list[tuple[int, tuple[int, ...]]]] = {}
    for k in range(last + 1):
        m = messages[k]
        if (m.topic, m.key) not in watch:
            continue
        out = decode(m, ref)
        if isinstance(out, list):
            for ch in out:
                best.setdefault((ch.source, ch.entity, ch.key), []).append((k, tuple(ch.order)))
    kept = []
    for s in sorted(candidates.values(), key=lambda s: s.index):
        seen = best.get((s.source, s.entity, s.record_key), [])
        if all(v < s.version for k, v in seen if k < s.index):
            kept.append(s)
    return kept


def _drive(
    bootstrap: str,
    chunks: Sequence[Chunk],
    rate: float,
    chunk_samples: dict[int, list[int]],
    conn: Connection,
) -> None:
    """Producer process: send the pre-encoded `chunks` at `rate` messages a second.

    Reports the wall-clock time just before each request that carries samples.
    """
    import resource

    producer = RawProducer(bootstrap)
    sent = 0
    error: str | None = None
    t0 = time.time()
    try:
        for no, chunk in enumerate(chunks):
            delay = t0 + chunk.first / rate - time.time()
            if delay > 0:
                time.sleep(delay)
            watched = chunk_samples.get(no)
            if watched:
                now = time.time()
                conn.send(("samples", [(s, now) for s in watched]))
            producer.send(chunk)
            sent += chunk.count
            if producer.error:
                break
        if not producer.wait(30.0) and producer.error is None:
            error = "the broker did not acknowledge every request within 30 s"
        error = producer.error or error
    except OSError as exc:
        error = f"load connection: {exc}"
    finally:
        producer.close()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    conn.send(
        (
            "done",
            {
                "sent": sent,
                "seconds": time.time() - t0,
                "cpu_s": ru.ru_utime + ru.ru_stime,
                "error": error,
            },
        )
    )
    conn.close()


def _samples(
    port: int, metric: str, label: str, timeout_s: float
) -> list[tuple[str, float]] | None:
    """(value of `label`, sample value) of every sample of `metric` the flow serves, or None."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as r:
            text = r.read().decode()
    except (OSError, ValueError):
        return None
    out: list[tuple[str, float]] = []
    marker = f'{label}="'
    for line in text.splitlines():
        if line.startswith(metric + "{"):
            labels, _, value = line.rpartition(" ")
            out.append((labels.split(marker, 1)[1].split('"', 1)[0], float(value)))
    return out


def scrape_commit_histogram(port: int, timeout_s: float = 5.0) -> dict[str, Any] | None:
    """The flow's own `sferp_view_commit_seconds` histogram (consume to view commit), if served.

    Returns bucket upper bounds with cumulative counts, and the p50/p99 bucket bounds.
    """
    samples = _samples(port, "sferp_view_commit_seconds_bucket", "le", timeout_s)
    buckets = sorted((math.inf if le == "+Inf" else float(le), n) for le, n in samples or [])
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]

    def bound(q: float) -> float | None:
        for le, count in buckets:
            if count >= q * total:
                return None if math.isinf(le) else le
        return None

    return {
        "count": int(total),
        "p50_le_s": bound(0.50),
        "p99_le_s": bound(0.99),
        "buckets": [[None if math.isinf(le) else le, int(c)] for le, c in buckets],
    }


def scrape_busy(port: int, timeout_s: float = 5.0) -> dict[str, float] | None:
    """The flow's `sferp_worker_busy_seconds_total` by stage, summed over its workers."""
    out: dict[str, float] = {}
    for stage, seconds in (
        _samples(port, "sferp_worker_busy_seconds_total", "stage", timeout_s) or []
    ):
        out[stage] = out.get(stage, 0.0) + seconds
    return out or None


def busy_between(
    before: dict[str, float] | None, after: dict[str, float] | None, seconds: float
) -> dict[str, Any] | None:
    """Share of `seconds` the workers spent in each stage between two `scrape_busy` readings."""
    if not before or not after or seconds <= 0:
        return None
    stages = {k: round((after[k] - before.get(k, 0.0)) / seconds, 4) for k in after}
    return {"total": round(sum(stages.values()), 4), "stages": stages, "seconds": round(seconds, 2)}


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted values (inf when it falls on an unobserved sample)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def consumed(views_path: str) -> int | None:
    """Messages the flow has accounted for in flow_stats (committed), None if unknown."""
    try:
        res = fetch("SELECT sum(consumed) FROM flow_stats", views_path, max_rows=1, timeout_s=10)
    except QueryFailed:
        return None
    value = res.rows[0][0] if res.rows else None
    return int(value) if value is not None else 0


def _sql_list(keys: Sequence[str]) -> str:
    return ", ".join("'" + k.replace("'", "''") + "'" for k in keys)


def run_phase(
    bootstrap: str,
    views_path: str,
    messages: Sequence[RawMessage],
    samples: list[Sample],
    rate: float,
    *,
    warmup_s: float,
    poll_s: float = 0.1,
    drain_timeout_s: float = 30.0,
    expected_consumed: int | None = None,
) -> dict[str, Any]:
    """Produce `messages` at `rate` while watching `samples`; return latency statistics.

    The flow must already be running live on the messages' topics with its query
    endpoint up. After the producer finished, the phase waits (at most
    `drain_timeout_s`) until every sample was seen and, when `expected_consumed` is
    given, until flow_stats counts that many consumed messages (`catch_up_s`).
    """
    chunks = encode_chunks(messages, rate)  # before the clock starts: see rawproduce.py
    size = chunks[0].count if chunks else 1  # every chunk but the last has this size
    chunk_samples: dict[int, list[int]] = {}
    for no, s in enumerate(samples):
        chunk_samples.setdefault(s.index // size, []).append(no)
    produced: dict[int, float] = {}
    observed: dict[int, float] = {}
    ctx = multiprocessing.get_context("fork")
    recv, send_end = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_drive, args=(bootstrap, chunks, rate, chunk_samples, send_end), daemon=True
    )
    t_start = time.time()
    proc.start()
    send_end.close()
    producer_stats: dict[str, Any] | None = None
    query_errors = 0
    queries = 0
    query_s = 0.0
    deadline: float | None = None
    producer_done: float | None = None
    caught_up_at: float | None = None
    while True:
        while recv.poll():
            try:
                kind, body = recv.recv()
            except EOFError:
                break
            if kind == "samples":
                produced.update(body)
            else:
                producer_stats = body
                producer_done = time.time()
                deadline = producer_done + drain_timeout_s
        if producer_stats is None and not proc.is_alive() and not recv.poll():
            producer_stats = {"sent": None, "error": f"producer exited with {proc.exitcode}"}
            deadline = time.time()
        outstanding = [no for no in produced if no not in observed]
        if outstanding:
            outstanding.sort(key=produced.__getitem__)
            outstanding = outstanding[:500]
            keys = sorted({samples[no].record_key for no in outstanding})
            sql = (
                "SELECT source, entity, record_key, version FROM records "
                f"WHERE record_key IN ({_sql_list(keys)})"
            )
            q0 = time.time()
            try:
                result = fetch(sql, views_path, max_rows=10_000, timeout_s=10)
                queries += 1
                query_s += time.time() - q0
            except QueryFailed:
                query_errors += 1
                result = None
            t_seen = time.time()
            if result is not None:
                versions = {(r[0], r[1], r[2]): _version_tuple(r[3] or "") for r in result.rows}
                for no in outstanding:
                    s = samples[no]
                    v = versions.get((s.source, s.entity, s.record_key))
                    if v is not None and v >= s.version:
                        observed[no] = t_seen
        if deadline is not None:
            if time.time() > deadline:
                break
            if all(no in observed for no in produced):
                if caught_up_at is None and expected_consumed is not None:
                    done = consumed(views_path)
                    if done is not None and done >= expected_consumed:
                        caught_up_at = time.time()
                if caught_up_at is not None or expected_consumed is None:
                    break
        time.sleep(poll_s)
    proc.join(timeout=10)
    counted = [no for no in produced if produced[no] >= t_start + warmup_s]
    lat = sorted(observed[no] - produced[no] if no in observed else math.inf for no in counted)
    stats = producer_stats or {}
    sent = stats.get("sent") or 0
    secs = stats.get("seconds") or 0.0

    def num(x: float) -> float | None:
        return None if not math.isfinite(x) else round(x, 4)

    return {
        "target_rate": round(rate, 1),
        "achieved_rate": round(sent / secs, 1) if secs else None,
        "messages_sent": sent,
        "produce_seconds": round(secs, 2),
        "producer_cpu_s": round(stats.get("cpu_s", 0.0), 2),
        "producer_error": stats.get("error"),
        "samples_sent": len(produced),
        "samples_counted": len(counted),
        "samples_unobserved": sum(1 for x in lat if not math.isfinite(x)),
        "warmup_s": warmup_s,
        "poll_s": poll_s,
        "drain_timeout_s": drain_timeout_s,
        "queries": queries,
        "query_errors": query_errors,
        "query_seconds": round(query_s, 2),
        "catch_up_s": (
            round(caught_up_at - producer_done, 2) if caught_up_at and producer_done else None
        ),
        "p50_s": num(percentile(lat, 50)),
        "p95_s": num(percentile(lat, 95)),
        "p99_s": num(percentile(lat, 99)),
        "max_s": num(lat[-1]) if lat else None,
        "mean_s": num(sum(lat) / len(lat)) if lat and math.isfinite(lat[-1]) else None,
    }
