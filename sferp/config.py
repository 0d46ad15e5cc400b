"""Configuration: TOML file, `SFERP_<SECTION>__<KEY>` environment variables, command-line flags.

Precedence (CONTRACT §4.1): flags > environment > file > defaults. Unknown keys
are an error. Secrets are `SecretStr`, come only from the environment or from
`<name>_file` settings, and never appear in `redacted()` or in error messages.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

ENV_PREFIX = "SFERP_"


# Upper bound of interval settings: larger values overflowed timers (OverflowError).
DAY_S = 86_400
# Upper bound of memory limits in MB (2^32 MB = 4 PiB; DuckDB refused far larger values).
MAX_MEMORY_MB = 2**32


def is_host_port(text: str) -> bool:
    """True for `HOST:PORT` with a port from 1 to 65535."""
    host, sep, port = text.rpartition(":")
    return bool(sep and host and port.isdigit() and 1 <= int(port) <= 65535)


class ConfigError(Exception):
    """Bad configuration: the message is one line naming the setting (exit code 2)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class KafkaSettings(_Section):
    """Connection to the Kafka cluster holding the input and output topics."""

    bootstrap: str = "127.0.0.1:9092"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] = ""
    sasl_username: str = ""
    sasl_password: SecretStr | None = None  # environment only
    sasl_password_file: str = ""
    # OAUTHBEARER: the token file is re-read at every authentication (rotation).
    sasl_oauth_token: SecretStr | None = None  # environment only
    sasl_oauth_token_file: str = ""
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    ssl_password: SecretStr | None = None  # passphrase of ssl_keyfile; environment only
    ssl_password_file: str = ""
    ssl_check_hostname: bool = True
    start: Literal["earliest", "latest"] = "earliest"

    @field_validator("bootstrap")
    @classmethod
    def _bootstrap_has_port(cls, v: str) -> str:
        for hp in v.split(","):
            if not is_host_port(hp.strip()):
                raise ValueError(f"expected HOST:PORT[,HOST:PORT...], got {v!r}")
        return v


class TopicSettings(_Section):
    """Names of the input and output topics (CONTRACT §1 and §3.2)."""

    sf_cdc: str = "sf.cdc"
    erp_items: str = "erp.public.items"
    erp_inventory: str = "erp.public.inventory"
    erp_sales_orders: str = "erp.public.sales_orders"
    out_inventory: str = "reconciled.inventory"
    out_orders: str = "reconciled.orders"
    out_exceptions: str = "reconciled.exceptions"
    dlq: str = "integration.dlq"

    def input_roles(self) -> dict[str, str]:
        """Input topic name -> its role (`salesforce` or the ERP table)."""
        roles = {
            self.sf_cdc: "salesforce",
            self.erp_items: "items",
            self.erp_inventory: "inventory",
            self.erp_sales_orders: "sales_orders",
        }
        return {t: r for t, r in roles.items() if t}  # sf_cdc = "": Salesforce by polling only

    def outputs(self) -> list[str]:
        """All output topic names."""
        return [self.out_inventory, self.out_orders, self.out_exceptions, self.dlq]

    @model_validator(mode="after")
    def _one_role_per_topic(self) -> TopicSettings:
        """Every topic has its own name: two input roles on one topic would read it as one
        of them only (the other's messages all dead letters), and an output that is an input
        would read sferp's own records back (the DLQ's without end). Outputs may not be
        empty; an empty input is not read, but one input at least is needed."""
        # ConfigError, not ValueError: pydantic lets it through, naming the setting.
        seen: dict[str, str] = {}
        for name in type(self).model_fields:
            topic = getattr(self, name)
            if not topic:
                if name.startswith("out_") or name == "dlq":
                    raise ConfigError(f"topics.{name}: an output topic needs a name")
                continue
            if topic in seen:
                raise ConfigError(
                    f"topics.{name}: {topic!r} is already topics.{seen[topic]}; "
                    "every input and output topic needs its own name"
                )
            seen[topic] = name
        if not self.input_roles():
            raise ConfigError(
                "topics: sf_cdc, erp_items, erp_inventory and erp_sales_orders are all empty: "
                "nothing to read (ERP extract files and Salesforce polling join a flow that "
                "reads one Kafka input topic at least)"
            )
        return self


class FlowSettings(_Section):
    """Event-time rules of CONTRACT §2 and operational intervals."""

    dedup_window_s: int = Field(3600, ge=0)
    allowed_lateness_s: int = Field(30, ge=0)
    handoff_sla_s: int = Field(900, ge=0)
    max_future_skew_s: int = Field(300, ge=0)
    max_message_bytes: int = Field(1_048_576, ge=1)
    max_fields: int = Field(1000, ge=1)  # fields of one event body or row image (too_many_fields)
    snapshot_interval_s: float = Field(5, gt=0, le=DAY_S)
    batch_size: int = Field(8000, ge=1)
    # Live reading: each partition's records wait for the next multiple of this on the wall
    # clock, so all partitions hand over together (fewer, larger batches;
    # docs/performance-history.md).
    linger_ms: int = Field(100, ge=0, le=10_000)
    # Added to the nice value of the views writer's commits (and DuckDB's threads) and of
    # the Kafka output producer: a worker thread keeps its core (sferp/priority.py).
    background_nice: int = Field(10, ge=0, le=19)
    # glibc keeps its mmap threshold at 128 KiB instead of raising it to every large
    # block freed: freed large blocks go back to the system (sferp/native_heap.py).
    return_freed_memory: bool = True


class ViewSettings(_Section):
    """Where the DuckDB views live, and how much memory DuckDB may keep for them."""

    path: str = Field("data/views.duckdb", min_length=1)
    # DuckDB's memory_limit in the writer's process (DuckDB's default: 80 % of RAM).
    memory_limit_mb: int = Field(256, ge=64, le=MAX_MEMORY_MB)


class MetricsSettings(_Section):
    """Prometheus endpoint of each process: port + process id (0: any free port)."""

    port: int = Field(9464, ge=0, le=65535)
    bind: str = "127.0.0.1"
    ready_max_lag: int = Field(1000, ge=0)  # /readyz: at most this many messages behind
    poll_interval_s: float = Field(5, gt=0, le=DAY_S)  # how often end offsets are read for lag


class SalesforceSettings(_Section):
    """Optional direct Salesforce API connection (polling, re-reads, write-back)."""

    instance_url: str = ""
    api_version: str = "62.0"
    auth: Literal["jwt", "client_credentials", "password", "session"] = "jwt"
    username: str = ""
    consumer_key: str = ""
    private_key_file: str = ""
    consumer_secret: SecretStr | None = None
    consumer_secret_file: str = ""
    password: SecretStr | None = None
    password_file: str = ""
    security_token: SecretStr | None = None
    security_token_file: str = ""
    session_id: SecretStr | None = None
    session_id_file: str = ""
    ca_bundle: str = ""
    poll_objects: list[str] = Field(default_factory=list)
    poll_interval_s: float = Field(30, gt=0, le=DAY_S)
    lookback_s: int = Field(300, ge=0)
    writeback: bool = False
    api_reserve_fraction: float = Field(0.2, ge=0, le=1)
    # Beyond CONTRACT §4.1 (README "Connecting to Salesforce").
    login_url: str = "https://login.salesforce.com"  # JWT audience; test.salesforce.com: sandbox
    client_id: str = "sferp"  # Sforce-Call-Options client: marks write-back echoes in CDC
    timeout_s: float = Field(30, gt=0, le=DAY_S)
    calls_per_minute: float = Field(60, gt=0)
    bulk_threshold: int = Field(10_000, ge=0)
    writeback_order_no_field: str = "ERP_Order_No__c"
    writeback_stage_field: str = "ERP_Stage__c"
    writeback_invoiced_at_field: str = "ERP_Invoiced_At__c"
    writeback_atp_field: str = "Available_To_Promise__c"


EXTRACT_TABLES = ("items", "inventory", "sales_orders")
# README "Batch extracts": <table>.<full|delta>[.<seq>][.<YYYYMMDDTHHMMSS[mmm]Z>].<ext>
DEFAULT_EXTRACT_PATTERN = (
    r"(?P<table>[A-Za-z][A-Za-z0-9_]*)\.(?P<kind>full|delta)"
    r"(?:\.(?P<seq>[0-9]{1,9}))?(?:\.(?P<ts>[0-9]{8}T[0-9]{6}(?:[0-9]{3})?Z))?"
    r"\.(?P<ext>csv|csv\.gz|parquet|jsonl|jsonl\.gz|ndjson)"
)


class ErpExtractSettings(_Section):
    """Scheduled ERP extract files as an input beside Kafka (README "Batch extracts")."""

    path: str = ""  # directory of extract files; empty: no extracts
    tables: list[str] = Field(default_factory=lambda: list(EXTRACT_TABLES))
    poll_interval_s: float = Field(10, gt=0, le=DAY_S)
    format: Literal["auto", "csv", "parquet", "jsonl"] = "auto"
    bad_row_tolerance: float = Field(0.0, ge=0, lt=1)  # fraction of a file's rows
    file_pattern: str = DEFAULT_EXTRACT_PATTERN
    delete_column: str = "_deleted"
    csv_delimiter: str = Field(",", min_length=1, max_length=1)
    state_dir: str = ""  # empty: <views path>.extracts
    memory_limit_mb: int = Field(256, ge=64, le=MAX_MEMORY_MB)
    settle_s: float = Field(
        2.0, ge=0, le=DAY_S
    )  # newer files wait this long (still being written?)

    @field_validator("tables")
    @classmethod
    def _known_tables(cls, v: list[str]) -> list[str]:
        for t in v:
            if t not in EXTRACT_TABLES:
                raise ValueError(f"unknown table {t!r}; known: {', '.join(EXTRACT_TABLES)}")
        return v

    @field_validator("file_pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        import re

        try:
            groups = re.compile(v).groupindex
        except re.error as e:
            raise ValueError(f"not a regular expression: {e}") from None
        if "table" not in groups or "kind" not in groups or not {"seq", "ts"} & set(groups):
            raise ValueError("needs the named groups table, kind, and seq or ts")
        return v


class SecuritySettings(_Section):
    """Field-level encryption and the audit log (docs/data-protection.md)."""

    # `<entity>.<field>`: a Salesforce object or ERP table and one of its fields,
    # or a text column of a view (`order_status.account_id`).
    encrypt_fields: list[str] = Field(default_factory=list)
    # Key ring `kid:<base64 of 32 bytes>[,kid:...]`: SFERP_SECURITY__ENCRYPTION_KEYS only.
    encryption_keys: SecretStr | None = None
    encryption_keys_file: str = ""
    encryption_key_id: str = ""  # the key for new writes; empty: the ring's first
    audit_log: bool = True
    audit_retention_days: int = Field(90, ge=0)  # 0: keep forever

    @field_validator("encrypt_fields")
    @classmethod
    def _field_names(cls, v: list[str]) -> list[str]:
        if v:
            from sferp.protect import check_fields_setting

            check_fields_setting(v)  # ConfigError naming the setting and the entry
        return v

    @model_validator(mode="after")
    def _key_ring(self) -> SecuritySettings:
        # Raises ConfigError (not a ValueError: pydantic lets it through) naming the setting.
        if not (
            self.encrypt_fields
            or self.encryption_keys is not None
            or self.encryption_keys_file
            or self.encryption_key_id
        ):
            return self
        from sferp.protect import check_security

        check_security(self)
        return self


# Settings that are secrets: they may come from the environment (or `<name>_file`),
# never from the TOML file, which is often checked in.
SECRETS = {
    ("kafka", "sasl_password"),
    ("kafka", "sasl_oauth_token"),
    ("kafka", "ssl_password"),
    ("salesforce", "consumer_secret"),
    ("salesforce", "password"),
    ("salesforce", "security_token"),
    ("salesforce", "session_id"),
    ("security", "encryption_keys"),
}


class Settings(_Section):
    """The whole configuration."""

    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    flow: FlowSettings = FlowSettings()
    views: ViewSettings = ViewSettings()
    metrics: MetricsSettings = MetricsSettings()
    salesforce: SalesforceSettings = SalesforceSettings()
    erp_extracts: ErpExtractSettings = ErpExtractSettings()
    security: SecuritySettings = SecuritySettings()

    def secret(self, section: str, name: str) -> str | None:
        """The secret's value, from the environment or from its `<name>_file`."""
        sec = getattr(self, section)
        value: SecretStr | None = getattr(sec, name)
        if value is not None:
            return value.get_secret_value()
        path = getattr(sec, f"{name}_file", "")
        if path:
            try:
                return Path(path).read_text().strip()
            except OSError as e:
                raise ConfigError(f"{section}.{name}_file: cannot read {path}: {e.strerror}") from e
            except UnicodeDecodeError:  # never the bytes: they are the secret
                raise ConfigError(f"{section}.{name}_file: {path} is not UTF-8 text") from None
        return None

    def kafka_client_config(self) -> dict[str, Any]:
        """kafka-python keyword arguments for security (TLS, SASL), for every Kafka client.

        Raises ConfigError (one line naming the setting, never a secret's value)
        for combinations that cannot work or would silently weaken security:
        TLS files, a SASL mechanism or SASL credentials with a protocol that does not use them,
        missing or unreadable credentials, unloadable certificates.
        """
        k = self.kafka
        proto = k.security_protocol
        tls = proto in ("SSL", "SASL_SSL")
        sasl = proto.startswith("SASL")
        cfg: dict[str, Any] = {"security_protocol": proto}
        tls_settings = {
            "ssl_cafile": k.ssl_cafile,
            "ssl_certfile": k.ssl_certfile,
            "ssl_keyfile": k.ssl_keyfile,
            "ssl_password_file": k.ssl_password_file,
        }
        if not tls:
            for name, value in tls_settings.items():
                if value:
                    raise ConfigError(
                        f"kafka.{name}: set, but kafka.security_protocol is {proto}, which "
                        "does not use TLS (use SSL or SASL_SSL)"
                    )
            if k.ssl_password is not None:
                raise ConfigError(
                    f"SFERP_KAFKA__SSL_PASSWORD: set, but kafka.security_protocol is {proto}, "
                    "which does not use TLS (use SSL or SASL_SSL)"
                )
        else:
            cfg.update(self._kafka_tls_config())
        if not sasl:
            if k.sasl_mechanism:
                raise ConfigError(
                    f"kafka.sasl_mechanism: set to {k.sasl_mechanism}, but "
                    f"kafka.security_protocol is {proto} (use SASL_PLAINTEXT or SASL_SSL)"
                )
            # Credentials without SASL would connect unauthenticated: say so, as for TLS files.
            for name, is_set in (
                ("kafka.sasl_username", bool(k.sasl_username)),
                ("SFERP_KAFKA__SASL_PASSWORD", k.sasl_password is not None),
                ("kafka.sasl_password_file", bool(k.sasl_password_file)),
                ("SFERP_KAFKA__SASL_OAUTH_TOKEN", k.sasl_oauth_token is not None),
                ("kafka.sasl_oauth_token_file", bool(k.sasl_oauth_token_file)),
            ):
                if is_set:
                    raise ConfigError(
                        f"{name}: set, but kafka.security_protocol is {proto}, which does "
                        "not authenticate (use SASL_PLAINTEXT or SASL_SSL)"
                    )
            return cfg
        if not k.sasl_mechanism:
            raise ConfigError("kafka.sasl_mechanism: required with a SASL security_protocol")
        cfg["sasl_mechanism"] = k.sasl_mechanism
        oauth = k.sasl_oauth_token is not None or bool(k.sasl_oauth_token_file)
        if k.sasl_mechanism == "OAUTHBEARER":
            cfg["sasl_oauth_token_provider"] = self._kafka_token_provider()
            if k.sasl_username:
                raise ConfigError("kafka.sasl_username: not used with SASL OAUTHBEARER")
            if k.sasl_password is not None or k.sasl_password_file:
                raise ConfigError(
                    "kafka.sasl_password: not used with SASL OAUTHBEARER "
                    "(the token comes from kafka.sasl_oauth_token_file)"
                )
            return cfg
        if oauth:
            raise ConfigError(
                "kafka.sasl_oauth_token_file (or SFERP_KAFKA__SASL_OAUTH_TOKEN): only used "
                f"with sasl_mechanism OAUTHBEARER, not {k.sasl_mechanism}"
            )
        password = self.secret("kafka", "sasl_password")
        if not k.sasl_username or not password:
            raise ConfigError(
                "kafka.sasl_username and SFERP_KAFKA__SASL_PASSWORD (or "
                "kafka.sasl_password_file): required for SASL " + k.sasl_mechanism
            )
        cfg["sasl_plain_username"] = k.sasl_username
        cfg["sasl_plain_password"] = password
        return cfg

    def _kafka_tls_config(self) -> dict[str, Any]:
        """The ssl_* settings, checked by loading them as the client will."""
        import ssl

        k = self.kafka
        cfg: dict[str, Any] = {"ssl_check_hostname": k.ssl_check_hostname}
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(k, name)
            if not path:
                continue
            try:
                with open(path, "rb"):
                    pass
            except OSError as e:
                raise ConfigError(f"kafka.{name}: cannot read {path}: {e.strerror}") from None
            cfg[name] = path
        if k.ssl_keyfile and not k.ssl_certfile:
            raise ConfigError("kafka.ssl_keyfile: set without kafka.ssl_certfile")
        password = self.secret("kafka", "ssl_password")
        if password is not None and not k.ssl_keyfile and not k.ssl_certfile:
            raise ConfigError(
                "kafka.ssl_password_file (or SFERP_KAFKA__SSL_PASSWORD): set without "
                "kafka.ssl_certfile / kafka.ssl_keyfile"
            )
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if k.ssl_cafile:
            try:
                ctx.load_verify_locations(cafile=k.ssl_cafile)
            except (ssl.SSLError, ValueError) as e:
                raise ConfigError(
                    f"kafka.ssl_cafile: {k.ssl_cafile} holds no usable PEM certificate "
                    f"({getattr(e, 'reason', None) or type(e).__name__})"
                ) from None
        if k.ssl_certfile:
            try:
                # A callable, never None: OpenSSL would prompt on the terminal for the
                # passphrase of an encrypted key.
                ctx.load_cert_chain(k.ssl_certfile, k.ssl_keyfile or None, lambda: password or "")
            except (ssl.SSLError, ValueError, OSError) as e:
                # The ssl module's messages name no secret; keep only its reason code.
                raise ConfigError(
                    "kafka.ssl_certfile: cannot load the client certificate and key "
                    f"({getattr(e, 'reason', None) or type(e).__name__}; wrong "
                    "ssl_keyfile or ssl_password?)"
                ) from None
        if password is not None:
            cfg["ssl_password"] = password
        return cfg

    def _kafka_token_provider(self) -> Any:
        """The OAUTHBEARER token provider: from the token file, else the environment."""
        from sferp.kafka_auth import FileTokenProvider, StaticTokenProvider, TokenUnavailable

        k = self.kafka
        if k.sasl_oauth_token is not None and k.sasl_oauth_token_file:
            raise ConfigError(
                "kafka.sasl_oauth_token_file: set together with SFERP_KAFKA__SASL_OAUTH_TOKEN; "
                "give one"
            )
        if k.sasl_oauth_token_file:
            provider = FileTokenProvider(k.sasl_oauth_token_file)
            try:
                provider.token()  # readable and not empty now; re-read at each login
            except TokenUnavailable as e:
                raise ConfigError(str(e)) from None
            return provider
        token = k.sasl_oauth_token.get_secret_value() if k.sasl_oauth_token else ""
        if not token.strip():
            raise ConfigError(
                "kafka.sasl_oauth_token_file (or SFERP_KAFKA__SASL_OAUTH_TOKEN): required "
                "for SASL OAUTHBEARER"
            )
        return StaticTokenProvider(token.strip())

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict, secrets replaced by '***' (safe to log)."""
        return self.model_dump(mode="json")  # SecretStr dumps as '**********'


def _env_overrides(environ: dict[str, str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    sections = Settings.model_fields
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        if section not in sections:
            raise ConfigError(f"{name}: unknown section {section!r}")
        model = sections[section].annotation
        fields = model.model_fields  # type: ignore[union-attr]
        if key not in fields:
            raise ConfigError(f"{name}: unknown setting {section}.{key}")
        if fields[key].annotation == list[str]:
            out.setdefault(section, {})[key] = _env_list(name, value)
        else:
            out.setdefault(section, {})[key] = value
    return out


def _env_list(name: str, value: str) -> list[str]:
    """A list setting from the environment: a JSON list (`["Order", "Product2"]`) or
    comma-separated names (`Order,Product2`)."""
    if value.lstrip().startswith("["):
        try:
            items = json.loads(value)
        except ValueError:
            raise ConfigError(f"{name}: not a JSON list of strings: {value[:80]!r}") from None
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise ConfigError(f"{name}: not a JSON list of strings: {value[:80]!r}")
        return [v.strip() for v in items if v.strip()]
    return [v.strip() for v in value.split(",") if v.strip()]


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _deep_merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    overrides: dict[str, dict[str, Any]] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Build the settings from file, environment and flag overrides; raise ConfigError."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError as e:
            raise ConfigError(f"--config: file not found: {path}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"--config: {path} is not valid TOML: {e}") from e
        except UnicodeDecodeError as e:  # TOML is UTF-8
            raise ConfigError(f"--config: {path} is not UTF-8 text: {e.reason}") from e
        except OSError as e:  # a directory, no permission...
            raise ConfigError(f"--config: cannot read {path}: {e.strerror or e}") from e
        for section, values in data.items():
            if isinstance(values, dict):
                for key in values:
                    if (section, key) in SECRETS:
                        raise ConfigError(
                            f"{section}.{key}: secrets are not read from the config file; use "
                            f"SFERP_{section.upper()}__{key.upper()} or {section}.{key}_file"
                        )
    env = _env_overrides(dict(os.environ if environ is None else environ))
    data = _deep_merge(data, env)
    if overrides:
        data = _deep_merge(data, overrides)
    try:
        return Settings.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown setting"
        raise ConfigError(f"{loc}: {msg}") from None
