"""Running the reconcile flow: settings, recovery store, cluster flags, clean stop.

Bytewax 0.21 does not stop cleanly by itself (SIGTERM ends the process at
once, nothing flushed or snapshotted). We install our own SIGTERM/SIGINT
handlers that make every source partition end, so the dataflow drains, the
sinks flush, the last snapshot is written, and the process exits 0.
"""

from __future__ import annotations

import argparse
import fcntl
import gc
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from sferp import recovery as _recovery
from sferp.config import ConfigError, Settings, is_host_port, load_settings

log = logging.getLogger("sferp")

# Recovery partitions of a new store: see sferp/recovery.py for the choice.
RECOVERY_PARTITIONS = _recovery.RECOVERY_PARTITIONS


class ClusterError(RuntimeError):
    """A process of a multi-process cluster went away, which stops the others."""


@dataclass
class RunOptions:
    """Everything `sferp run` decides besides the settings."""

    bounded: bool = False
    views_path: str | None = None
    recovery_dir: str | None = None
    workers_per_process: int = 1
    process_id: int | None = None
    addresses: list[str] | None = None
    stop_event: threading.Event = field(default_factory=threading.Event)
    install_signals: bool = True
    kafka_outputs: bool = True
    preflight: bool = True  # check the broker and the input topics before starting


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from --config, the environment and the flags (flags win)."""
    overrides: dict[str, dict[str, Any]] = {}
    if args.bootstrap is not None:  # an empty flag is an error, not "unset"
        overrides.setdefault("kafka", {})["bootstrap"] = args.bootstrap
    if getattr(args, "start", None):
        overrides.setdefault("kafka", {})["start"] = args.start
    if args.views is not None:
        overrides.setdefault("views", {})["path"] = args.views
    return load_settings(args.config, overrides=overrides)


def run_command(args: argparse.Namespace) -> int:
    """`sferp run`: validate, then run the flow until caught up or stopped."""
    settings = settings_from_args(args)
    addresses = [a for a in (args.addresses or "").split(";") if a] or None
    if args.workers_per_process < 1:
        raise ConfigError("-w/--workers-per-process: must be at least 1")
    if (args.process_id is None) != (addresses is None):
        raise ConfigError("-i/--process-id and -a/--addresses: give both or neither")
    if addresses and not 0 <= args.process_id < len(addresses):
        raise ConfigError(f"-i/--process-id: must be between 0 and {len(addresses) - 1}")
    for address in addresses or ():
        if not is_host_port(address):
            raise ConfigError(f"-a/--addresses: expected 'HOST:PORT;HOST:PORT...', got {address!r}")
    _setup_logging(args.log_format)
    opts = RunOptions(
        bounded=args.until_caught_up,
        views_path=args.views,
        recovery_dir=args.recovery_dir,
        workers_per_process=args.workers_per_process,
        process_id=args.process_id,
        addresses=addresses,
    )
    return run_flow(settings, opts)


def _stop_while_forming(
    formed: threading.Event, forming: threading.Lock, addresses: list[str], me: int
) -> Callable[[], None]:
    """Let SIGTERM and SIGINT stop a cluster process that waits for its peers.

    Bytewax connects the processes of a cluster before it runs any Python code,
    holding the main thread, where Python runs signal handlers: a process whose
    peers never came could not be stopped but with SIGKILL. The signals are also
    written to a pipe (`signal.set_wakeup_fd`); a thread reads it and, while the
    cluster has not formed, ends the process with exit 0: nothing was read or
    written yet (the recovery store's lock is released with the process).
    Afterwards the flow's own handler stops it cleanly. Returns the function that
    undoes this once the flow has ended.
    """
    others = ", ".join(a for i, a in enumerate(addresses) if i != me)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    stops = {int(signal.SIGTERM), int(signal.SIGINT)}

    def watch() -> None:
        while got := os.read(read_fd, 64):
            if not stops.intersection(got):
                continue
            with forming:  # the flow cannot start while this decides (see `started`)
                if formed.is_set():
                    continue  # the flow's own handler stops it: the bytes are only drained
                log.info(
                    "received a stop signal before the other processes of the cluster (%s) "
                    "connected: stopped, nothing was read",
                    others,
                )
                logging.shutdown()
                os._exit(0)

    threading.Thread(target=watch, name="sferp-cluster-wait", daemon=True).start()
    log.info("waiting for the other processes of the cluster (%s) to connect", others)

    def undo() -> None:
        signal.set_wakeup_fd(-1)
        os.close(write_fd)  # the thread reads end-of-file and ends

    return undo


def _prepare_views(settings: Settings, opts: RunOptions, resuming: bool) -> None:
    """Before the dataflow (with the recovery store's run lock held): a resume checks
    that the views file and its Kafka mirror are the store's (sferp/run_identity.py); a
    fresh start empties the views file and stamps the three with a new run id."""
    from sferp.connectors.kafka_outputs import mirror_path
    from sferp.run_identity import check_resume, stamp_all

    views = opts.views_path or settings.views.path
    mirror = mirror_path(views) if opts.recovery_dir else None
    # The topics the state depends on: the inputs, and the compacted outputs, whose keys a
    # renamed topic would lack (a DLQ may move: its records are not restated).
    topics = {k: v for k, v in settings.topics.model_dump().items() if k != "dlq"}
    if resuming:
        check_resume(views, mirror, opts.recovery_dir, topics)  # type: ignore[arg-type]
    else:
        start_views_file(views, settings)
        if opts.recovery_dir:  # only a resume checks the stamps
            stamp_all(views, mirror, opts.recovery_dir, topics)


def start_views_file(path: str, settings: Settings) -> None:
    """Empty the views file for a run without recovery state, with a zero `flow_stats`
    row per input topic.

    Such a run rebuilds the views from what it reads, but the writer opens its file
    with the first message that reaches it: without this, a run that read nothing
    (empty topics, `--start latest`) left no file, or the previous run's rows.
    """
    from sferp.connectors.duckdb_views import write_views_file

    zero = {(t,): (t, 0, 0, 0, 0, 0, 0) for t in sorted(settings.topics.input_roles())}
    write_views_file(path, [{"flow_stats": zero}])


def check_views_path(path: str, *, probe_lock: bool = True) -> None:
    """Raise ConfigError naming `views.path` unless the views file can be opened for writing;
    with `probe_lock`, also ViewsInUse while another process holds it (`_wait_unlocked`).

    Checked by trying (a scratch file beside it, or opening the file itself), because
    permission bits do not tell for root, read-only mounts or /proc.
    """
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"views.path: {path} is a directory")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.exists():
            with open(p, "r+b") as f:
                if probe_lock:
                    _wait_unlocked(f.fileno(), path)
        else:
            with tempfile.NamedTemporaryFile(dir=p.parent, prefix=f".{p.name}."):
                pass
    except OSError as e:
        raise ConfigError(f"views.path: cannot write {path}: {e.strerror or e}") from None


class ViewsInUse(RuntimeError):
    """Another process holds the views file (exit 1, one line)."""


def _wait_unlocked(fd: int, path: str, wait_s: float = 10.0) -> None:
    """Raise ViewsInUse while another process keeps DuckDB's lock on the file.

    DuckDB locks its file with fcntl; a `sferp query` on a stopped flow holds it a
    moment (waited for, as the writer does), another writer for good. Testing the
    lock here fails at once, instead of after the flow read Kafka for a while.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            if time.monotonic() > deadline:
                raise ViewsInUse(
                    f"views.path: {path} is in use by another process (another sferp run "
                    "writing these views?): stop it, or give this run its own --views"
                ) from None
            time.sleep(0.2)
        else:
            fcntl.lockf(fd, fcntl.LOCK_UN)
            return


def _setup_logging(fmt: str) -> None:
    # kafka-python logs every reconnect attempt; our connectors report failures
    # once, with the setting to look at.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    if logging.getLogger().handlers:
        return
    from sferp.logfmt import formatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def prepare_recovery(recovery_dir: str, process_id: int | None = None) -> Any:
    """Create the recovery store when empty (process 0), or wait for it; see sferp/recovery.py."""
    return _recovery.prepare_recovery(recovery_dir, process_id=process_id)


# Python's cyclic garbage collector rescans the flow's many long-lived small
# objects (merged records, dedup entries, view nodes) at every 700 allocations
# by default. Measured on 115k generated messages through the whole flow: 5.4 s
# of CPU with the default thresholds, 3.6 s with 100,000. Nothing in the flow
# relies on prompt collection of reference cycles. Live runs use 300,000: in 60 s
# phases at 80 % load (about 1M messages) the collector took 4.3-4.9 s at 100,000
# (longest pause 0.15-0.23 s), 2.6 s at 300,000 (0.30 s) and 1.8-1.9 s at
# 1,000,000 (0.62-0.67 s); 300,000 keeps most of the gain at half the pause.
GC_THRESHOLDS = (300_000, 50, 100)
# A bounded run (`--until-caught-up`: a catch-up or backfill) has no latency to keep,
# so it collects less often still: 500,000 messages took 16.5-16.9 s instead of
# 18.1-18.5 s at 100,000 (collector 0.5 s instead of 1.6 s, in one pause of about 0.5 s).
GC_THRESHOLDS_BOUNDED = (1_000_000, 50, 100)


# The worker thread shares the GIL with the DuckDB flusher, the query endpoint and
# kafka-python's I/O threads. Each of them, back from a call that released the GIL,
# waits up to the switch interval for the busy worker to hand it over (5 ms by
# default): a commit of ~20 statements then spent most of its time waiting, and the
# worker waited on those commits. Measured with 1 ms: 4 % more events/s bounded,
# live p99 at 80 % load 8.0 -> 5.6 s.
SWITCH_INTERVAL_S = 0.001


def tune_interpreter(*, bounded: bool = False) -> None:
    """Freeze start-up objects, raise the collector's thresholds (see GC_THRESHOLDS,
    GC_THRESHOLDS_BOUNDED) and shorten the GIL switch interval (see SWITCH_INTERVAL_S)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*(GC_THRESHOLDS_BOUNDED if bounded else GC_THRESHOLDS))
    sys.setswitchinterval(SWITCH_INTERVAL_S)


def run_flow(settings: Settings, opts: RunOptions) -> int:
    """Build and run the reconcile flow in this process; return the exit code."""
    from sferp.native_heap import fix_malloc_thresholds

    if settings.flow.return_freed_memory:
        fix_malloc_thresholds()  # before the flow allocates: see sferp/native_heap.py

    if opts.preflight:
        # Fail with one clear line before Bytewax starts (it reports errors raised
        # inside workers as a panic with a backtrace).
        from sferp.connectors.kafka import list_partitions

        if opts.process_id in (None, 0):  # the process that writes the views
            # With a recovery store its lock is probed once the store's run lock is held
            # (below): a rolling update's second run waits there for the first to stop.
            check_views_path(
                opts.views_path or settings.views.path, probe_lock=not opts.recovery_dir
            )
        list_partitions(
            settings.kafka.bootstrap,
            list(settings.topics.input_roles()),
            settings.kafka_client_config(),
            missing_ok=True,  # unless none exists (CONTRACT §4 reading: README "Command line")
            warn=True,
        )
        if settings.salesforce.instance_url:  # README "Connecting to Salesforce"
            from sferp.connectors.sf_client import preflight

            preflight(settings)
    from sferp.metrics import recovery_has_state

    resuming = recovery_has_state(opts.recovery_dir)
    recovery_config = (
        prepare_recovery(opts.recovery_dir, opts.process_id) if opts.recovery_dir else None
    )
    try:
        if opts.process_id in (None, 0):  # the process that writes the views
            if opts.preflight and opts.recovery_dir:  # after the store's run lock (above)
                check_views_path(opts.views_path or settings.views.path)
            _prepare_views(settings, opts, resuming)
        return _run_prepared(settings, opts, recovery_config, resuming)
    finally:
        if recovery_config is not None:
            _recovery.release_run_lock(opts.recovery_dir)  # the next run may have the store


def _run_prepared(
    settings: Settings, opts: RunOptions, recovery_config: Any, resuming: bool
) -> int:
    """Build the flow and run it on a prepared recovery store (or none)."""
    from bytewax._bytewax import cli_main

    from sferp.flows.reconcile import FlowOptions, build_flow
    from sferp.metrics import create_monitor

    views_path = opts.views_path or settings.views.path
    Path(views_path).parent.mkdir(parents=True, exist_ok=True)
    monitor = create_monitor(
        settings,
        views_path=views_path,
        bounded=opts.bounded,
        process_id=opts.process_id,
        workers=opts.workers_per_process,
        resuming=resuming,
    )
    formed = threading.Event()  # the cluster's processes are connected
    forming = threading.Lock()  # held by the signal watcher while it decides to exit

    def started() -> None:  # once per worker: the first one says it
        if formed.is_set():
            return
        with forming:
            formed.set()
        if opts.addresses:
            log.info("all %d processes of the cluster are connected", len(opts.addresses))

    flow_opts = FlowOptions(
        on_started=started,
        bounded=opts.bounded,
        views_path=views_path,
        recovery=recovery_config is not None,
        writer=opts.process_id in (None, 0),
        stop_event=opts.stop_event,
        kafka_outputs=opts.kafka_outputs,
        metrics=monitor,
    )
    flow = build_flow(settings, flow_opts)
    tune_interpreter(bounded=opts.bounded)
    previous: dict[int, Any] = {}
    if opts.install_signals and threading.current_thread() is threading.main_thread():

        def stop(signum: int, _frame: Any) -> None:
            log.info("received %s: finishing the current batch, flushing, snapshotting", signum)
            opts.stop_event.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, stop)
    log.info(
        "starting: bootstrap=%s views=%s bounded=%s workers=%d process=%d of %d",
        settings.kafka.bootstrap,
        views_path,
        opts.bounded,
        opts.workers_per_process,
        opts.process_id or 0,
        len(opts.addresses or [None]),
    )
    monitor.start()
    undo_watch = None
    if opts.addresses and opts.install_signals and previous:
        undo_watch = _stop_while_forming(formed, forming, opts.addresses, opts.process_id or 0)
    try:
        cli_main(
            flow,
            workers_per_process=opts.workers_per_process,
            process_id=opts.process_id,
            addresses=opts.addresses,
            epoch_interval=timedelta(seconds=settings.flow.snapshot_interval_s),
            recovery_config=recovery_config,
        )
    except BaseException as exc:
        # A cluster peer that dies (kill -9, a lost machine) ends the others with a
        # Rust panic in Timely's network threads: say so in one line (exit 1).
        if type(exc).__name__ != "PanicException" or not opts.addresses:
            raise
        lost_peer = True
    else:
        lost_peer = False
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if undo_watch is not None:
            undo_watch()
        monitor.stop()
    if lost_peer:
        raise ClusterError(
            "the cluster lost a process (its connection broke); restart every process "
            "of the cluster: they resume from the recovery store"
        )
    log.info("stopped")
    return 0
