"""The `sferp` command line (CONTRACT §4).

Exit codes: 0 success, 2 bad usage or configuration (one line naming the
problem), 1 anything else.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from sferp.config import ConfigError
from sferp.usage import OneLineParser, int_between

USAGE = """sferp <command> [options]

commands:
  demo       everything embedded: broker, generated streams, flow, views; prints a summary
  run        run the reconcile flow against Kafka
  generate   write a synthetic Salesforce + ERP change stream to Kafka or JSONL files
  query      run a read-only SQL query on the views (works while a flow runs)
  broker     run the embedded Kafka-compatible broker in the foreground
  bench      throughput benchmarks
  plan       capacity planning from benchmark results
  forget     erase one data subject from a stopped flow's views (GDPR erasure)
  decrypt    like query, with encrypted fields decrypted (needs the key ring)
  rekey      re-encrypt a stopped flow's encrypted values with the current key

sferp --version prints the installed version.
"""


def run_parser() -> argparse.ArgumentParser:
    """Arguments of `sferp run`."""
    p = OneLineParser(prog="sferp run", description="Run the reconcile dataflow.")
    p.add_argument("--config", help="TOML configuration file")
    p.add_argument("--bootstrap", help="Kafka bootstrap HOST:PORT (overrides kafka.bootstrap)")
    p.add_argument("--views", help="DuckDB views file (overrides views.path)")
    p.add_argument("--recovery-dir", help="Bytewax recovery store directory (created when empty)")
    p.add_argument("--start", choices=["earliest", "latest"], help="where a first run starts")
    p.add_argument(
        "--until-caught-up",
        action="store_true",
        help="read every partition up to its end at start, flush, exit 0",
    )
    p.add_argument("-w", "--workers-per-process", type=int, default=1, help="worker threads")
    p.add_argument("-i", "--process-id", type=int, help="this process's index in the cluster")
    p.add_argument("-a", "--addresses", help="all cluster processes: 'host:port;host:port'")
    p.add_argument("--log-format", choices=["text", "json"], default="text")
    return p


# Commands that create files with the flow's data (README "Security").
PRIVATE_FILES = frozenset({"run", "demo", "forget", "rekey"})


class _StoppedStarting(Exception):
    """SIGTERM or SIGINT reached `sferp run` before the flow's own handler was installed."""


_stop_signal: list[int] = []


def _stop_while_starting(signum: int, _frame: object) -> None:
    # Until the flow installs its handler (sferp/runner.py), a stop signal ends the run
    # cleanly: what start-up did is in transactions or idempotent (store, views file).
    _stop_signal.append(signum)
    raise _StoppedStarting(signum)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `sferp` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("sferp: a command is required (see sferp --help)", file=sys.stderr)
        raise SystemExit(2)
    if args[0] in ("-h", "--help", "help"):
        print(USAGE)
        raise SystemExit(0)
    if args[0] in ("-V", "--version", "version"):
        from importlib import metadata

        try:
            print(f"sferp {metadata.version('sferp')}")
        except metadata.PackageNotFoundError:  # run from a source tree that is not installed
            print("sferp (version unknown: not installed)")
        raise SystemExit(0)
    cmd, rest = args[0], args[1:]
    if cmd == "run":
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _stop_while_starting)
    if cmd in PRIVATE_FILES:
        # The views, recovery snapshots, extract state and audit log hold customer
        # data: what these commands create is readable by the service's user only.
        os.umask(0o077)
    try:
        code = _dispatch(cmd, rest)
    except ConfigError as e:
        print(f"sferp {cmd}: configuration error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, exit 1
        if _stop_signal:  # _StoppedStarting, or a library's own error for it ("interrupted")
            print(
                f"sferp {cmd}: stopped by signal {_stop_signal[0]} while starting", file=sys.stderr
            )
            code = 0
        elif os.environ.get("SFERP_DEBUG"):
            raise
        else:
            print(f"sferp {cmd}: error: {_root_message(e)}", file=sys.stderr)
            code = 1
    raise SystemExit(code)


def _root_message(e: BaseException) -> str:
    """The most useful one-line message in an exception chain.

    Bytewax wraps errors raised inside the dataflow (a missing topic, an
    unreachable broker) in its own runtime errors; our connectors' errors carry
    the message a user needs, so prefer the innermost of those.
    """
    from sferp.broker import BrokerError
    from sferp.connectors.kafka import KafkaConnectorError
    from sferp.runner import ViewsInUse

    chain: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in chain:
        chain.append(cur)
        # `raise ... from None` ends the chain there: what it hides is not the reason
        if cur.__cause__ is not None:
            cur = cur.__cause__
        else:
            cur = None if cur.__suppress_context__ else cur.__context__
    for exc in reversed(chain):
        if isinstance(exc, KafkaConnectorError | BrokerError | ViewsInUse):
            return str(exc).splitlines()[0]
    first = str(chain[-1]).strip().splitlines()
    return f"{type(chain[-1]).__name__}: {first[0] if first else ''} (SFERP_DEBUG=1 for details)"


def _dispatch(cmd: str, rest: list[str]) -> int:
    if cmd == "run":
        from sferp.runner import run_command

        return run_command(run_parser().parse_args(rest))
    if cmd == "demo":
        from sferp.demo import cli_demo

        return cli_demo(rest)
    if cmd == "generate":
        from sferp.generator import cli_generate

        return cli_generate(rest)
    if cmd == "query":
        from sferp.query import cli_query

        return cli_query(rest)
    if cmd == "forget":  # docs/data-protection.md
        from sferp.forget import cli_forget

        return cli_forget(rest)
    if cmd in ("decrypt", "rekey"):
        from sferp.protect import cli_decrypt, cli_rekey

        return cli_decrypt(rest) if cmd == "decrypt" else cli_rekey(rest)
    if cmd == "broker":
        from sferp.broker import run_foreground

        p = OneLineParser(prog="sferp broker", description="Run the embedded broker.")
        p.add_argument("--port", type=int_between(0, 65535), default=9092)
        return run_foreground(p.parse_args(rest).port)
    if cmd in ("bench", "plan"):
        try:
            from sferp.benchmarks.bench import cli_bench, cli_plan
        except ImportError:
            print(f"sferp {cmd}: the benchmark suite is not installed yet", file=sys.stderr)
            return 1
        return cli_bench(rest) if cmd == "bench" else cli_plan(rest)
    print(f"sferp: unknown command {cmd!r} (see 'sferp --help')", file=sys.stderr)
    return 2
