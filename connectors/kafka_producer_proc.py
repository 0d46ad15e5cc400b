"""A kafka-python producer in a child process, for the flow's busiest output.

kafka-python spends ~20 µs of Python per record it sends (record encoding,
accumulator bookkeeping, a future per record), all under the flow's GIL: about
an eighth of a worker's time when the views change as fast as they do during a
catch-up. This module moves the producer into its own process: the flow hands
over whole batches through a pipe (one pickled list per batch, a few µs per
record at most) and the child does the per-record work on another core.

Interface and delivery guarantee are those of `kafka._KafkaSinkPartition`:
`send` does not wait (a failed delivery is raised by the next `send` or
`flush` at the latest), `flush` returns only when every record sent so far is
acknowledged, `close` flushes. The pipe preserves order, so per-key order is
the caller's. If the child dies, the next call raises; nothing is dropped
silently.
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.util  # before the atexit hook below: see _close_pipes_at_exit
import os
import pickle
import signal
import weakref
from collections.abc import Iterable
from typing import Any

from bytewax.outputs import StatelessSinkPartition
from sferp.connectors.kafka import KafkaConnectorError, SinkItem, _KafkaSinkPartition

from sferp.priority import lower_process

__all__ = ["ProducerProcess"]

_SEND, _FLUSH, _CLOSE = 0, 1, 2
_READY_TIMEOUT_S = 60.0


def _serve(conn: Any, config: dict[str, Any], bootstrap: str, nice: int = 0) -> None:
    """Child: run one producer; answer flush/close with (ok, failure text or None).

    It ignores SIGINT and SIGTERM: Ctrl-C in a terminal, and service managers that stop
    a whole process group, signal it together with the flow, which must still flush
    through it before it closes the pipe (or dies, EOF below).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    lower_process(nice)  # background work: the worker thread keeps its core
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    try:
        part = _KafkaSinkPartition(KafkaProducer(**config), bootstrap)
    except KafkaError as exc:
        conn.send((False, f"cannot connect to Kafka at {bootstrap}: {exc}"))
        return
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, then exit
        conn.send((False, f"cannot start the producer: {exc!r}"))
        return
    conn.send((True, None))
    try:
        _answer_until_closed(conn, part)
    except _ParentGone:
        # The parent died without closing (kill -9): stop at once, unflushed.
        # Everything before its last snapshot was flushed then; the rest is
        # replayed after the resume, and a late delivery from here (kafka-python's
        # exit hook would flush) could land after the resumed run restored a key
        # (kafka_outputs.py).
        os._exit(0)


class _ParentGone(Exception):
    """The pipe to the parent ended: EOF between messages, or an OSError ("got end of
    file during message", a reset or broken pipe) within one or while answering."""


def _answer_until_closed(conn: Any, part: _KafkaSinkPartition) -> None:
    """Send, flush and close as the parent asks; return after close."""

    def answer(reply: tuple[bool, str | None]) -> None:
        try:
            conn.send(reply)
        except OSError:
            raise _ParentGone from None

    failure: str | None = None
    while True:
        try:
            raw = conn.recv_bytes()
        except (EOFError, OSError):
            raise _ParentGone from None
        op, items = pickle.loads(raw)
        try:
            if op == _SEND:
                if failure is None:
                    part.send(items)
                continue
            if op == _FLUSH:
                part.flush()
            else:
                part.close()
        except KafkaConnectorError as exc:
            if failure is None and op == _SEND:
                answer((False, str(exc)))  # unsolicited: the parent's next call raises
            failure = failure or str(exc)
        if op == _SEND:
            continue
        answer((failure is None, failure))
        if op == _CLOSE:
            return


_LIVE: weakref.WeakSet[ProducerProcess] = weakref.WeakSet()


@atexit.register
def _close_pipes_at_exit() -> None:
    """Close the pipes of producers still open when the interpreter exits.

    The children ignore SIGTERM (see `_serve`), which is how multiprocessing's own exit
    hook stops daemon children before it joins them: a producer still referenced at
    exit (a traceback keeping a partition alive) would hang the exit. Registered after
    multiprocessing's hook, so it runs before it (atexit runs last-in, first-out): the
    children read end-of-file and exit at once, unflushed, as after a crash.
    """
    for producer in list(_LIVE):
        producer._conn.close()


class ProducerProcess(StatelessSinkPartition[SinkItem]):
    """The `_KafkaSinkPartition` interface, backed by a producer in a child process."""

    def __init__(self, config: dict[str, Any], bootstrap: str, nice: int = 0) -> None:
        """Start the child (at `nice` lower priority than this process) and wait until it
        has connected."""
        ctx = multiprocessing.get_context("spawn")  # never fork a process running threads
        self._bootstrap = bootstrap
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_serve, args=(child, config, bootstrap, nice), name="sferp-producer", daemon=True
        )
        self._proc.start()
        child.close()
        self._closed = False
        _LIVE.add(self)
        ok, why = self._reply(_READY_TIMEOUT_S)
        if not ok:
            self._proc.join(5)
            raise KafkaConnectorError(why)

    def _reply(self, timeout_s: float | None = None) -> tuple[bool, str | None]:
        try:
            if timeout_s is not None and not self._conn.poll(timeout_s):
                self._proc.kill()
                raise KafkaConnectorError(
                    f"the producer process for Kafka at {self._bootstrap} did not answer"
                )
            return self._conn.recv()  # type: ignore[no-any-return]
        except (EOFError, OSError) as exc:
            raise KafkaConnectorError(
                f"the producer process for Kafka at {self._bootstrap} died "
                f"(exit code {self._proc.exitcode})"
            ) from exc

    def _post(self, op: int, items: Any = None) -> None:
        try:
            self._conn.send_bytes(pickle.dumps((op, items), protocol=pickle.HIGHEST_PROTOCOL))
        except (BrokenPipeError, OSError) as exc:
            raise KafkaConnectorError(
                f"the producer process for Kafka at {self._bootstrap} died "
                f"(exit code {self._proc.exitcode})"
            ) from exc

    def send(self, items: Iterable[SinkItem]) -> None:
        """Hand items to the child without waiting (it reports failures at the next flush)."""
        if self._conn.poll():  # only a failure is ever sent unasked
            ok, why = self._reply()
            if not ok:
                raise KafkaConnectorError(why)
        batch = items if isinstance(items, list) else list(items)
        if batch:
            self._post(_SEND, batch)

    def flush(self) -> None:
        """Wait until everything sent so far is delivered; raise if anything was not."""
        self._post(_FLUSH)
        ok, why = self._reply()
        if not ok:
            raise KafkaConnectorError(why)

    def write_batch(self, items: list[SinkItem]) -> None:
        """Send and wait for every delivery."""
        self.send(items)
        self.flush()

    def close(self) -> None:
        """Flush, stop the child; raise if a delivery failed."""
        if self._closed:
            return
        self._closed = True
        try:
            self._post(_CLOSE)
            ok, why = self._reply()
        finally:
            self._conn.close()
            self._proc.join(30)
            if self._proc.is_alive():
                self._proc.kill()
        if not ok:
            raise KafkaConnectorError(why)
