"""Decoder microbenchmark: microseconds per message of `decode_batch` over generated traffic.

    .venv/bin/python -m sferp.benchmarks.decodebench [--orders N] [--repeat R]

Decodes the generator's stream (every Salesforce and Debezium form, 1 % bad
messages) in batches of 500, as the flow does, and reports the best of R runs
(the least disturbed by other programs) with the mean message size. Used to
check that decoder hardening (docs/semantics.md §1 limits) costs nothing
measurable on the hot path.
"""

from __future__ import annotations

import argparse
import timeit

from sferp.operators.decode import DecodeConfig, decode_batch

from sferp.demo import generated_messages
from sferp.events import RawMessage
from sferp.generator import GeneratorConfig


def measure(orders: int = 2000, repeat: int = 15, seed: int = 7) -> tuple[float, float, int]:
    """(best µs per message, mean value bytes, messages) of decoding the generated stream."""
    cfg = GeneratorConfig(orders=orders, duplicates=0.05, disorder=0.1, bad=0.01, seed=seed)
    msgs = generated_messages(cfg)
    roles = {
        cfg.topics["sf_cdc"]: "salesforce",
        cfg.topics["erp_items"]: "items",
        cfg.topics["erp_inventory"]: "inventory",
        cfg.topics["erp_sales_orders"]: "sales_orders",
    }
    dcfg = DecodeConfig(topics=roles)
    # decode_batch may reuse the parsed objects; the raw bytes are what it reads,
    # so the same messages can be decoded again and again.
    batches: list[list[RawMessage]] = [msgs[i : i + 500] for i in range(0, len(msgs), 500)]

    def run() -> None:
        for b in batches:
            decode_batch(b, dcfg)

    best = min(timeit.repeat(run, number=1, repeat=repeat))
    size = sum(len(m.value or b"") for m in msgs) / len(msgs)
    return best / len(msgs) * 1e6, size, len(msgs)


def main() -> None:
    """Print µs per message."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--orders", type=int, default=2000)
    p.add_argument("--repeat", type=int, default=15)
    args = p.parse_args()
    us, size, n = measure(args.orders, args.repeat)
    print(f"decode: {us:.3f} µs/message over {n} messages of {size:.0f} bytes on average")


if __name__ == "__main__":
    main()
