"""Kafka client security helpers (README "Security"): OAUTHBEARER tokens, TLS diagnosis.

kafka-python asks its `sasl_oauth_token_provider` for a token at every
authentication (each new broker connection). `FileTokenProvider` re-reads the
token file each time, so a sidecar or cron job that rotates the file is picked
up without a restart; `StaticTokenProvider` serves a token given in the
environment. Neither ever shows its token in `repr()` or in an error message.

kafka-python reports a failed TLS handshake or SASL login only as "Unable to
bootstrap"; `connection_problem` repeats the TLS handshake with the standard
library to say why (an unknown CA, a host name mismatch, a listener that does
or does not speak TLS) and, when TLS is fine, points at the SASL credentials.
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path
from typing import Any

from kafka.errors import KafkaConfigurationError
from kafka.net.sasl.oauth import AbstractTokenProvider

__all__ = ["FileTokenProvider", "StaticTokenProvider", "TokenUnavailable", "connection_problem"]


class TokenUnavailable(KafkaConfigurationError):
    """The OAUTHBEARER token cannot be read (missing or empty file); names the file only."""


class FileTokenProvider(AbstractTokenProvider):
    """Reads the bearer token from a file at every authentication (rotation-friendly)."""

    def __init__(self, path: str, setting: str = "kafka.sasl_oauth_token_file") -> None:
        """`setting` names the configuration key in error messages."""
        super().__init__()
        self.path = path
        self.setting = setting

    def token(self) -> str:
        """The file's content without surrounding whitespace; TokenUnavailable if none."""
        try:
            text = Path(self.path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise TokenUnavailable(f"{self.setting}: cannot read {self.path}: {why}") from None
        if not text:
            raise TokenUnavailable(f"{self.setting}: {self.path} is empty")
        return text

    def __repr__(self) -> str:
        return f"FileTokenProvider({self.path!r})"


class StaticTokenProvider(AbstractTokenProvider):
    """A fixed token (from SFERP_KAFKA__SASL_OAUTH_TOKEN); hidden from repr()."""

    def __init__(self, token: str) -> None:
        """Keep the token; it is only handed to kafka-python's SASL exchange."""
        super().__init__()
        self._token = token

    def token(self) -> str:
        """The token."""
        return self._token

    def __repr__(self) -> str:
        return "StaticTokenProvider('**********')"


def _client_context(cfg: dict[str, Any]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cfg.get("ssl_cafile") or None)
    ctx.check_hostname = bool(cfg.get("ssl_check_hostname", True))
    if cfg.get("ssl_certfile"):
        ctx.load_cert_chain(
            cfg["ssl_certfile"], cfg.get("ssl_keyfile") or None, cfg.get("ssl_password") or None
        )
    return ctx


def connection_problem(bootstrap: str, cfg: dict[str, Any], timeout_s: float = 4.0) -> str | None:
    """Why kafka-python could not connect with these settings, as far as can be told, or None.

    With SSL or SASL_SSL, a TLS handshake as kafka-python would do it; with
    PLAINTEXT or SASL_PLAINTEXT, whether the listener answers TLS instead (a
    missing `security_protocol`). When a server is reachable (and TLS works) but
    the client still failed with SASL configured, the SASL login is the suspect.
    None when nothing is found (or no server can be reached at all:
    kafka-python's own message says that).
    """
    tls = cfg.get("security_protocol") in ("SSL", "SASL_SSL")
    try:
        if tls:
            ctx = _client_context(cfg)
        else:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
    except (OSError, ssl.SSLError, ValueError) as exc:
        return f"cannot load the TLS settings ({exc})"
    deadline = time.monotonic() + timeout_s  # all servers together
    reached = ""
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        host = host.strip("[]")
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            raw = socket.create_connection((host, int(port)), timeout=left)
        except (OSError, ValueError):
            continue
        try:
            with ctx.wrap_socket(raw, server_hostname=host):
                pass
        except ssl.SSLCertVerificationError as exc:
            where = (
                "kafka.ssl_check_hostname"
                if "mismatch" in str(exc.verify_message).lower()
                else "kafka.ssl_cafile"
            )
            return (
                f"TLS: {server.strip()} presented a certificate that is not trusted "
                f"({exc.verify_message}; check {where})"
            )
        except (ssl.SSLError, OSError) as exc:
            if tls:
                why = exc.reason if isinstance(exc, ssl.SSLError) else (exc.strerror or "no answer")
                return (
                    f"TLS: no TLS handshake with {server.strip()} ({why}); does this listener "
                    "use TLS (kafka.security_protocol)?"
                )
            reached = reached or server.strip()  # plaintext listener, as configured
            continue
        else:
            if not tls:
                return (
                    f"{server.strip()} speaks TLS: set kafka.security_protocol to SSL or SASL_SSL"
                )
            reached = reached or server.strip()
            continue
        finally:
            raw.close()
    mechanism = cfg.get("sasl_mechanism")
    if reached and str(cfg.get("security_protocol", "")).startswith("SASL") and mechanism:
        secret = (
            "kafka.sasl_oauth_token_file or SFERP_KAFKA__SASL_OAUTH_TOKEN"
            if mechanism == "OAUTHBEARER"
            else "kafka.sasl_username and its password"
        )
        return (
            f"{reached} accepts connections, but the client did not get through the SASL "
            f"{mechanism} login: check {secret}"
        )
    return None
