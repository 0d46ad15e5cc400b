"""Coverage-guided fuzzing of the decoder with atheris (libFuzzer), for `make fuzz`.

    .venv/bin/python tests/fuzz_atheris.py [-atheris_runs=N] [libFuzzer flags...]

Optional: atheris is not a dependency. When it is not installed this prints a
line and exits 0. The corpus starts from the generator's traffic (every
Salesforce form, both Debezium envelopes, bad messages); each input picks a
topic, a Kafka key and a value. Checked for every input: `decode_batch` raises
nothing, gives exactly one outcome for the message, and a dead letter carries
a known reason code. Not collected by pytest (the name does not start with
`test_`).
"""

from __future__ import annotations

import os
import sys
import tempfile

try:
    import atheris
except ImportError:  # pragma: no cover - depends on the machine
    print("atheris is not installed: skipping the coverage-guided decoder fuzz")
    raise SystemExit(0) from None

with atheris.instrument_imports():
    from sferp.operators.decode import DecodeConfig, decode_batch
    from sferp.operators.decode_common import REASONS

from sferp.events import Change, DeadLetter, Ignored, RawMessage

TOPICS = ["sf.cdc", "erp.public.items", "erp.public.inventory", "erp.public.sales_orders"]
ROLES = dict(zip(TOPICS, ["salesforce", "items", "inventory", "sales_orders"], strict=True))
CFG = DecodeConfig(topics=ROLES, max_message_bytes=65_536, max_fields=40)
IGNORED_WHY = {"tombstone", "entity", "op_t", "op_m"}


def split(data: bytes) -> tuple[str, bytes | None, bytes | None]:
    """Input layout: topic byte, key byte (bit 7: a key, bits 0-5: its length), key, value.

    An empty value is a tombstone.
    """
    if len(data) < 2:
        return TOPICS[0], None, None
    topic = TOPICS[data[0] % 4]
    n = data[1] & 0x3F
    has_key = bool(data[1] & 0x80)
    key = data[2 : 2 + n] if has_key else None
    value = data[2 + n :] if has_key else data[2:]
    return topic, key, value or None


def check(data: bytes) -> None:
    """One fuzz input (see split()): decode it and check the outcome."""
    topic, key, value = split(data)
    msg = RawMessage(topic, 1, 42, key, value, -1)
    out = decode_batch([msg], CFG)
    primary = [o for o in out if type(o) is not Change or o.primary]
    if len(primary) != 1:
        raise AssertionError(f"{len(primary)} outcomes for one message: {out!r}")
    o = primary[0]
    if (o.topic, o.partition, o.offset) != (topic, 1, 42):
        raise AssertionError(f"wrong coordinates: {o!r}")
    if type(o) is DeadLetter and o.reason not in REASONS:
        raise AssertionError(f"unknown reason {o.reason!r}")
    if type(o) is Ignored and o.why not in IGNORED_WHY:
        raise AssertionError(f"unknown ignored kind {o.why!r}")
    if (value is None) != (type(o) is Ignored and o.why == "tombstone"):
        raise AssertionError(f"tombstone handling: {o!r}")


def seed_corpus(directory: str) -> None:
    """Write the generator's messages as starting inputs in check()'s format."""
    from sferp.demo import generated_messages
    from sferp.generator import GeneratorConfig

    cfg = GeneratorConfig(orders=30, duplicates=0.05, disorder=0.2, bad=0.05, seed=5)
    for i, m in enumerate(generated_messages(cfg)):
        if m.topic not in ROLES or m.value is None:
            continue
        key = (m.key or b"")[:63]
        head = bytes([TOPICS.index(m.topic), (0x80 | len(key)) if m.key else 0])
        with open(os.path.join(directory, f"seed-{i:05d}"), "wb") as f:
            f.write(head + key + m.value)


def main() -> None:
    """Run libFuzzer over the decoder; corpus in a temporary directory unless one is given."""
    argv = list(sys.argv)
    if not any(not a.startswith("-") for a in argv[1:]):
        corpus = tempfile.mkdtemp(prefix="sferp-atheris-")
        seed_corpus(corpus)
        argv.append(corpus)
    atheris.Setup(argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
