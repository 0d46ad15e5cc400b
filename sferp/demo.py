"""`sferp demo`: the whole system on one machine, in under a minute.

Starts the embedded broker, generates a realistic Salesforce + ERP change
stream (with duplicates, disorder and bad messages), runs the reconcile flow
until caught up, prints the key views, and checks them against the reference
model. Leaves the views file for `sferp query`.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path

from sferp.broker import EmbeddedBroker
from sferp.compare import diff, load_views
from sferp.config import load_settings
from sferp.duckdb_connect import connect
from sferp.events import RawMessage
from sferp.generator import GeneratorConfig, generate, produce
from sferp.query import run_query
from sferp.reference import ReferenceConfig, compute
from sferp.runner import RunOptions, run_flow
from sferp.usage import OneLineParser, int_between

QUERIES = [
    (
        "Inventory: lowest available-to-promise first (what can we promise?)",
        "SELECT sku, on_hand, allocated, sf_open_demand, available_to_promise "
        "FROM inventory_live ORDER BY available_to_promise, sku LIMIT 8",
    ),
    (
        "Order pipeline by stage (booking to cash)",
        "SELECT stage, count(*) AS orders, sum(sf_total) AS sf_total, "
        "round(avg(quote_to_cash_s) / 3600, 1) AS avg_quote_to_cash_h "
        "FROM order_status GROUP BY stage ORDER BY orders DESC",
    ),
    (
        "Open reconciliation exceptions by kind",
        "SELECT kind, count(*) AS open FROM reconciliation_exceptions WHERE open "
        "GROUP BY kind ORDER BY open DESC",
    ),
    (
        "Flow statistics per input topic",
        "SELECT topic, consumed, applied, duplicates, late, dead_lettered, ignored "
        "FROM flow_stats ORDER BY topic",
    ),
]


def generated_messages(cfg: GeneratorConfig) -> list[RawMessage]:
    """The generated stream as the broker will hold it (offsets per partition from 0)."""
    next_offset: dict[tuple[str, int], int] = defaultdict(int)
    out = []
    for m in generate(cfg):
        tp = (m.topic, m.partition)
        out.append(RawMessage(m.topic, m.partition, next_offset[tp], m.key, m.value, -1))
        next_offset[tp] += 1
    return out


def cli_demo(argv: list[str]) -> int:
    """Run the demo; exit 0 when the views equal the reference model."""
    p = OneLineParser(prog="sferp demo", description=__doc__)
    p.add_argument("--orders", type=int_between(0), default=3000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--views", default="data/views.duckdb")
    args = p.parse_args(argv)
    views = Path(args.views)
    views.parent.mkdir(parents=True, exist_ok=True)
    for stale in (views, Path(f"{views}.wal")):
        stale.unlink(missing_ok=True)
    gen = GeneratorConfig(
        orders=args.orders, duplicates=0.05, disorder=0.10, bad=0.01, partitions=3, seed=args.seed
    )
    t0 = time.monotonic()
    with EmbeddedBroker() as broker:
        print(f"embedded broker on {broker.bootstrap}")
        settings = load_settings(overrides={"kafka": {"bootstrap": broker.bootstrap}})
        topics = settings.topics
        broker.create_topics({t: 3 for t in [*topics.input_roles(), *topics.outputs()]})
        counts = produce(gen, broker.bootstrap)
        print(f"generated {sum(counts.values()):,} change events for {args.orders:,} orders")
        t1 = time.monotonic()
        # Ctrl-C stops the flow as it stops `sferp run` (drain, flush, close the views).
        opts = RunOptions(bounded=True, views_path=str(views))
        run_flow(settings, opts)
        flow_s = time.monotonic() - t1
    if opts.stop_event.is_set():
        print(f"sferp demo: interrupted; {views} holds what was read so far", file=sys.stderr)
        return 130
    with connect(str(views), read_only=True) as con:
        consumed = con.execute("SELECT sum(consumed) FROM flow_stats").fetchone()[0] or 0
    print(f"flow caught up: {consumed:,} messages in {flow_s:.1f} s\n")
    for title, sql in QUERIES:
        print(f"== {title}")
        run_query(sql, str(views))
        print()
    expected = compute(generated_messages(gen), ReferenceConfig.default())
    problems = diff(expected, load_views(views))
    total = time.monotonic() - t0
    if problems:
        print("views differ from the reference model:", file=sys.stderr)
        for line in problems:
            print("  " + line, file=sys.stderr)
        return 1
    print(f"views equal the reference model: yes ({total:.1f} s in all)")
    print(f'query them: sferp query "SELECT * FROM order_status LIMIT 5" --views {views}')
    return 0
