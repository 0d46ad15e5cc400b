"""Test helpers for Kafka over TLS: a throw-away CA and a TLS-terminating proxy.

The embedded broker (Tansu 0.6.0) cannot serve TLS itself (its `--cert` and
`--key` options refuse to be given together), so the tests put `TlsProxy` in
front of a plaintext broker that advertises the proxy's address: every client
connection, the bootstrap one and those to the advertised broker, then goes
through the proxy. The proxy peeks at the first byte of each connection: a TLS
ClientHello is terminated with the test CA's server certificate; a plaintext
Kafka request is passed through only while `strict` is off (the broker's own
start-up probe and topic creation use plaintext), and is refused and counted
once `strict` is on.

With `sasl=SaslGate(...)` the proxy also plays the broker's part of SASL
(Tansu cannot check credentials with in-memory storage): it answers
SaslHandshake and SaslAuthenticate itself, checking PLAIN passwords and
OAUTHBEARER tokens, and passes a connection on to the broker only once it has
authenticated; any other request before that closes the connection.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import re
import select
import socket
import ssl
import struct
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CLIENT_KEY_PASSWORD = "client-key-passphrase"


@dataclass(frozen=True)
class Pki:
    """PEM files: a CA, a server certificate it signed and its key, and a client
    certificate it signed with its key (encrypted with CLIENT_KEY_PASSWORD)."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_pki(
    directory: Path, label: str = "sferp test", names: tuple[str, ...] = ("localhost", "127.0.0.1")
) -> Pki:
    """A fresh CA, a server certificate for `names` (DNS names or IP addresses) and a client
    certificate, valid for a day."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name(f"{label} CA"))
        .issuer_name(_name(f"{label} CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = (
        x509.CertificateBuilder()
        .subject_name(_name("sferp"))
        .issuer_name(ca.subject)
        .public_key(client_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([x509.OID_CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(
        directory / "ca.pem",
        directory / "server.pem",
        directory / "server.key",
        directory / "client.pem",
        directory / "client.key",
    )
    pki.client_cert.write_bytes(client.public_bytes(serialization.Encoding.PEM))
    pki.client_key.write_bytes(
        client_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(CLIENT_KEY_PASSWORD.encode()),
        )
    )
    pki.client_key.chmod(0o600)
    pki.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pki.key.chmod(0o600)
    return pki


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SASL_HANDSHAKE, SASL_AUTHENTICATE, API_VERSIONS = 17, 36, 18
SASL_AUTHENTICATION_FAILED, UNSUPPORTED_SASL_MECHANISM = 58, 33
_BEARER = re.compile(rb"\x01auth=Bearer ([^\x01]+)\x01")


def _uvarint(data: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _put_uvarint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


class SaslGate:
    """The broker's side of SASL (SaslHandshake v1, SaslAuthenticate v0-v2): PLAIN against
    `users`, OAUTHBEARER against `tokens` (a set the test may change at any time)."""

    def __init__(self, users: dict[str, str] | None = None, tokens: set[str] | None = None):
        """Accept these PLAIN users (name -> password) and these bearer tokens."""
        self.users = dict(users or {})
        self.tokens = tokens if tokens is not None else set()

    def mechanisms(self) -> list[str]:
        """What the handshake offers."""
        return (["PLAIN"] if self.users else []) + (["OAUTHBEARER"] if self.tokens else [])

    def check(self, mechanism: str, auth: bytes) -> bool:
        """Whether the client's first SASL message authenticates it."""
        if mechanism == "PLAIN":
            parts = auth.split(b"\0")
            if len(parts) != 3:
                return False
            user, password = parts[1].decode(errors="replace"), parts[2].decode(errors="replace")
            return user in self.users and self.users[user] == password
        if mechanism == "OAUTHBEARER":
            m = _BEARER.search(auth)
            return m is not None and m.group(1).decode(errors="replace") in self.tokens
        return False


class _SaslSession:
    """One connection's SASL state: reads client frames until it has authenticated."""

    def __init__(self, gate: SaslGate, count: Callable[[str], None]) -> None:
        self.gate = gate
        self.count = count
        self.buf = b""
        self.mechanism = ""
        self.done = False

    def feed(self, data: bytes) -> tuple[bytes, bytes, bool]:
        """(bytes for the broker, bytes for the client, close the connection)."""
        if self.done:
            return data, b"", False
        self.buf += data
        upstream, reply = b"", b""
        while not self.done and len(self.buf) >= 4:
            (size,) = struct.unpack(">i", self.buf[:4])
            if len(self.buf) < 4 + size:
                break
            frame, self.buf = self.buf[4 : 4 + size], self.buf[4 + size :]
            api_key, version, corr = struct.unpack(">hhi", frame[:8])
            if api_key == API_VERSIONS:
                upstream += struct.pack(">i", size) + frame
            elif api_key == SASL_HANDSHAKE and version == 1:
                reply += self._handshake(frame, corr)
            elif api_key == SASL_AUTHENTICATE and self.mechanism:
                answer, ok = self._authenticate(frame, version, corr)
                reply += answer
                if not ok:
                    self.count("sasl_failed")
                    return upstream, reply, True
                self.count("sasl_ok")
                self.done = True
                upstream += self.buf
                self.buf = b""
            else:
                self.count("sasl_skipped")
                return upstream, reply, True
        return upstream, reply, False

    @staticmethod
    def _after_client_id(frame: bytes) -> int:
        (n,) = struct.unpack(">h", frame[8:10])
        return 10 + max(n, 0)

    def _handshake(self, frame: bytes, corr: int) -> bytes:
        pos = self._after_client_id(frame)
        (n,) = struct.unpack(">h", frame[pos : pos + 2])
        mechanism = frame[pos + 2 : pos + 2 + n].decode()
        offered = self.gate.mechanisms()
        error = 0 if mechanism in offered else UNSUPPORTED_SASL_MECHANISM
        if not error:
            self.mechanism = mechanism
        body = struct.pack(">hi", error, len(offered))
        body += b"".join(struct.pack(">h", len(m)) + m.encode() for m in offered)
        return self._frame(struct.pack(">i", corr) + body)

    def _authenticate(self, frame: bytes, version: int, corr: int) -> tuple[bytes, bool]:
        pos = self._after_client_id(frame)
        if version >= 2:  # flexible: tagged fields after the header, compact bytes
            ntags, pos = _uvarint(frame, pos)
            for _ in range(ntags):
                _, pos = _uvarint(frame, pos)
                size, pos = _uvarint(frame, pos)
                pos += size
            length, pos = _uvarint(frame, pos)
            auth = frame[pos : pos + length - 1]
        else:
            (length,) = struct.unpack(">i", frame[pos : pos + 4])
            auth = frame[pos + 4 : pos + 4 + length]
        ok = self.gate.check(self.mechanism, auth)
        error = 0 if ok else SASL_AUTHENTICATION_FAILED
        message = None if ok else b"Authentication failed: invalid credentials"
        if version >= 2:
            body = struct.pack(">i", corr) + b"\0" + struct.pack(">h", error)
            body += b"\0" if message is None else _put_uvarint(len(message) + 1) + message
            body += _put_uvarint(1)  # empty auth_bytes
            body += struct.pack(">q", 0) + b"\0"
        else:
            body = struct.pack(">ih", corr, error)
            body += (
                struct.pack(">h", -1)
                if message is None
                else (struct.pack(">h", len(message)) + message)
            )
            body += struct.pack(">i", 0)
            if version == 1:
                body += struct.pack(">q", 0)
        return self._frame(body), ok

    @staticmethod
    def _frame(payload: bytes) -> bytes:
        return struct.pack(">i", len(payload)) + payload


class TlsProxy:
    """TLS termination on 127.0.0.1 in front of a plaintext TCP service (threads, real sockets)."""

    def __init__(self, target_port: int, pki: Pki, sasl: SaslGate | None = None) -> None:
        """Listen now (the port is known at once); forward to 127.0.0.1:`target_port`.

        Client certificates are optional, but one that is presented must be signed by
        the PKI's CA; connections that presented one are counted as `client_cert`.
        """
        self.target_port = target_port
        self.sasl = sasl
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self.ctx.load_cert_chain(pki.cert, pki.key)
        self.ctx.verify_mode = ssl.CERT_OPTIONAL
        self.ctx.load_verify_locations(cafile=pki.ca)
        self.strict = False
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="tls-proxy", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        """`127.0.0.1:PORT`."""
        return f"127.0.0.1:{self.port}"

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        mine = [client]
        self._track(client)
        try:
            client.settimeout(10)
            first = client.recv(1, socket.MSG_PEEK)
            if not first:
                return
            if first == b"\x16":  # TLS handshake record
                try:
                    conn: socket.socket = self.ctx.wrap_socket(client, server_side=True)
                except (ssl.SSLError, OSError):
                    self._count("handshake_failed")
                    return
                mine.append(conn)
                self._track(conn)
                self._count("tls")
                if conn.getpeercert():  # type: ignore[attr-defined]
                    self._count("client_cert")
            elif self.strict:
                self._count("plaintext_refused")
                return
            else:
                self._count("plaintext")
                conn = client
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            mine.append(upstream)
            self._track(upstream)
            conn.settimeout(None)
            upstream.settimeout(None)
            self._pump(conn, upstream)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.difference_update(mine)
            for s in reversed(mine):
                with contextlib.suppress(OSError):
                    s.close()

    def _pump(self, conn: socket.socket, upstream: socket.socket) -> None:
        pending = getattr(conn, "pending", lambda: 0)
        session = _SaslSession(self.sasl, self._count) if self.sasl is not None else None
        while not self._stopped.is_set():
            ready = [conn] if pending() else []
            if not ready:
                ready, _, _ = select.select([conn, upstream], [], [], 0.5)
            for s in ready:
                data = s.recv(65536)
                if not data:
                    return
                if s is not conn:
                    conn.sendall(data)
                elif session is None:
                    upstream.sendall(data)
                else:
                    forward, reply, close = session.feed(data)
                    if forward:
                        upstream.sendall(forward)
                    if reply:
                        conn.sendall(reply)
                    if close:
                        return

    def _track(self, s: socket.socket) -> None:
        with self._lock:
            self._open.add(s)

    def stop(self) -> None:
        """Stop accepting and close every connection."""
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            socks = list(self._open)
            self._open.clear()
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()
