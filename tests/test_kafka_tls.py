"""Kafka transport security (issue 6): the flow over real TLS and SASL, and the settings.

The embedded broker (Tansu 0.6.0) cannot serve TLS itself (its --cert and --key
options conflict) and keeps SASL users only in storage it cannot be given here,
so (tests/tlskit.py) a TLS-terminating proxy sits in front of a dedicated
broker that advertises the proxy's address: every connection of every client,
bootstrap and broker connections alike, crosses the proxy, which refuses
plaintext once the broker is up. For SASL a second such broker's proxy also
plays the broker's part of the SASL login (PLAIN passwords, OAUTHBEARER
tokens), so wrong credentials are really refused. The flow, the generator, the
DLQ reader all go through the proxies with the settings of `[kafka]`. SCRAM,
which the proxy does not implement, is tested up to kafka-python's first SASL
message. Secrets never show in output, errors or logs.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flowkit import read_topic
from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.net.sasl import get_sasl_mechanism
from sferp.connectors.kafka import KafkaConnectorError, list_partitions
from tlskit import CLIENT_KEY_PASSWORD, Pki, SaslGate, TlsProxy, free_port, make_pki

from sferp.broker import EmbeddedBroker
from sferp.compare import diff, load_views
from sferp.config import ConfigError, Settings, load_settings
from sferp.demo import generated_messages
from sferp.generator import GeneratorConfig, produce
from sferp.kafka_auth import FileTokenProvider, TokenUnavailable
from sferp.reference import ReferenceConfig, compute

ROLES = ("sf_cdc", "erp_items", "erp_inventory", "erp_sales_orders")
OUTPUTS = ("out_inventory", "out_orders", "out_exceptions", "dlq")
REF_ROLE = dict(zip(ROLES, ("salesforce", "items", "inventory", "sales_orders"), strict=True))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls(pki):
    """(proxy, broker): a broker reachable only through the TLS proxy, plaintext refused."""
    port = free_port()
    proxy = TlsProxy(port, pki)
    try:
        with EmbeddedBroker(port=port, advertised=proxy.address) as broker:
            proxy.strict = True  # from here on, TLS only
            yield proxy, broker
    finally:
        proxy.stop()


def tls_settings(pki: Pki, **kafka) -> Settings:
    values = {"security_protocol": "SSL", "ssl_cafile": str(pki.ca), **kafka}
    return load_settings(environ={}, overrides={"kafka": values})


def write_config(path: Path, names: dict[str, str], kafka: dict[str, str]) -> Path:
    lines = ["[kafka]"] + [f'{k} = "{v}"' for k, v in kafka.items()]
    lines += ["[topics]"] + [f'{role} = "{name}"' for role, name in names.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def create_topics(bootstrap: str, client_config: dict, topics: dict[str, int]) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, **client_config)
    try:
        admin.create_topics([NewTopic(t, n, 1) for t, n in topics.items()])
    finally:
        admin.close()


def sferp_run(config: Path, bootstrap: str, views: Path, env_extra: dict[str, str] | None = None):
    env = {**os.environ, "SFERP_METRICS__PORT": "0", **(env_extra or {})}
    started = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "sferp", "run", "--config", str(config), "--bootstrap", bootstrap]
        + ["--views", str(views), "--until-caught-up"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    return r, time.monotonic() - started


# --- the flow over TLS -----------------------------------------------------------------------


def test_flow_over_tls_with_client_certificate_equals_reference(tls, pki, tmp_path):
    proxy, _ = tls
    suffix = tmp_path.name[-10:]
    names = {role: f"{role}.tls.{suffix}" for role in ROLES + OUTPUTS}
    # mutual TLS: the client key is encrypted; its passphrase comes from the environment
    kafka = {
        "security_protocol": "SSL",
        "ssl_cafile": str(pki.ca),
        "ssl_certfile": str(pki.client_cert),
        "ssl_keyfile": str(pki.client_key),
    }
    env = {"SFERP_KAFKA__SSL_PASSWORD": CLIENT_KEY_PASSWORD}
    client = load_settings(environ=env, overrides={"kafka": kafka}).kafka_client_config()
    assert client["ssl_password"] == CLIENT_KEY_PASSWORD

    cfg = GeneratorConfig(
        orders=150,
        duplicates=0.05,
        disorder=0.2,
        bad=0.02,
        partitions=2,
        seed=61,
        topics={role: names[role] for role in ROLES},
    )
    produce(cfg, proxy.address, client_config=client)  # creates the input topics, over TLS
    create_topics(proxy.address, client, {names[o]: 1 for o in OUTPUTS})

    before = dict(proxy.counts)
    config = write_config(tmp_path / "sferp.toml", names, kafka)
    r, took = sferp_run(config, proxy.address, tmp_path / "views.duckdb", env)
    assert r.returncode == 0, r.stderr[-3000:]
    after = dict(proxy.counts)

    # every connection the flow made was TLS with the client certificate; none plaintext
    tls_conns = after.get("tls", 0) - before.get("tls", 0)
    assert tls_conns >= 2
    assert after.get("client_cert", 0) - before.get("client_cert", 0) == tls_conns
    assert after.get("plaintext_refused", 0) == before.get("plaintext_refused", 0)
    assert after.get("plaintext", 0) == before.get("plaintext", 0)

    views = load_views(tmp_path / "views.duckdb")
    ref_cfg = ReferenceConfig(topics={names[r]: REF_ROLE[r] for r in ROLES})
    assert diff(compute(generated_messages(cfg), ref_cfg), views) == []
    assert views.dead_letters  # bad messages were generated: the DLQ topic is written over TLS
    dlq = read_topic(proxy.address, names["dlq"], client)
    assert {(json.loads(m.value)["offset"], json.loads(m.value)["reason"]) for m in dlq} == {
        (d[2], d[3]) for d in views.dead_letters
    }
    assert CLIENT_KEY_PASSWORD not in r.stderr + r.stdout


def test_wrong_ca_fails_fast_with_one_clear_line(tls, pki, tmp_path):
    proxy, broker = tls
    other = make_pki(tmp_path / "other", "someone else")
    names = {role: f"{role}.x" for role in ROLES + OUTPUTS}
    config = write_config(
        tmp_path / "sferp.toml", names, {"security_protocol": "SSL", "ssl_cafile": str(other.ca)}
    )
    failed = proxy.counts.get("handshake_failed", 0)
    r, took = sferp_run(config, proxy.address, tmp_path / "views.duckdb")
    assert r.returncode == 1, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert "not trusted" in lines[-1] and "kafka.ssl_cafile" in lines[-1], r.stderr
    assert took < 60  # not a hang: kafka-python's bootstrap timeout, then the diagnosis
    assert proxy.counts["handshake_failed"] > failed
    assert not (tmp_path / "views.duckdb").exists()


def test_plaintext_client_against_the_tls_listener_is_told_so(tls):
    proxy, _ = tls
    refused = proxy.counts.get("plaintext_refused", 0)
    with pytest.raises(KafkaConnectorError, match="speaks TLS: set kafka.security_protocol"):
        list_partitions(proxy.address, ["nope"], {"security_protocol": "PLAINTEXT"})
    assert proxy.counts["plaintext_refused"] > refused


def test_tls_client_against_a_plaintext_listener_is_told_so(tls, pki):
    _, broker = tls  # the broker's own (plaintext) port
    client = tls_settings(pki).kafka_client_config()
    with pytest.raises(KafkaConnectorError, match="security_protocol"):
        list_partitions(broker.bootstrap, ["nope"], client)


def test_hostname_verification_follows_ssl_check_hostname(tls, pki, tmp_path):
    """A certificate for another name: refused by default, accepted when the check is off."""
    proxy, broker = tls
    elsewhere = make_pki(tmp_path / "named", "named", names=("kafka.example.internal",))
    # A second proxy (certificate for another host name, signed by another CA) in front of
    # the same broker: the bootstrap connection goes through it; the broker connections
    # then use the advertised first proxy, whose certificate the first CA signed.
    second = TlsProxy(broker.port, elsewhere)
    second.strict = True
    try:
        both_cas = tmp_path / "both.pem"
        both_cas.write_bytes(pki.ca.read_bytes() + elsewhere.ca.read_bytes())
        checked = tls_settings(pki, ssl_cafile=str(both_cas)).kafka_client_config()
        assert checked["ssl_check_hostname"] is True
        with pytest.raises(KafkaConnectorError, match="kafka.ssl_check_hostname"):
            list_partitions(second.address, ["nope"], checked)
        unchecked = tls_settings(pki, ssl_cafile=str(both_cas), ssl_check_hostname=False)
        cfg = unchecked.kafka_client_config()
        assert cfg["ssl_check_hostname"] is False
        create_topics(proxy.address, cfg, {f"named.{tmp_path.name[-8:]}": 2})
        parts = list_partitions(second.address, [f"named.{tmp_path.name[-8:]}"], cfg)
        assert len(parts) == 2
        assert second.counts["tls"] >= 1
    finally:
        second.stop()


# --- the flow over SASL_SSL --------------------------------------------------------------------

SASL_USER, SASL_PASSWORD = "svc", "pl4in-Passw0rd-q9"


@pytest.fixture(scope="module")
def sasl(pki):
    """(proxy, gate): TLS, then a SASL login checked by the proxy, then the broker."""
    port = free_port()
    proxy = TlsProxy(port, pki)
    gate = SaslGate(users={SASL_USER: SASL_PASSWORD}, tokens={"eyJ.token.one"})
    try:
        with EmbeddedBroker(port=port, advertised=proxy.address):
            proxy.strict = True
            proxy.sasl = gate
            yield proxy, gate
    finally:
        proxy.stop()


def oauth_kafka(pki: Pki, token_file: Path) -> dict[str, str]:
    return {
        "security_protocol": "SASL_SSL",
        "ssl_cafile": str(pki.ca),
        "sasl_mechanism": "OAUTHBEARER",
        "sasl_oauth_token_file": str(token_file),
    }


def test_flow_over_sasl_ssl_with_an_oauth_token_equals_reference(sasl, pki, tmp_path):
    proxy, gate = sasl
    token = tmp_path / "token"
    token.write_text("eyJ.token.one\n")
    kafka = oauth_kafka(pki, token)
    client = load_settings(environ={}, overrides={"kafka": kafka}).kafka_client_config()
    names = {role: f"{role}.sasl.{tmp_path.name[-10:]}" for role in ROLES + OUTPUTS}
    cfg = GeneratorConfig(
        orders=80,
        duplicates=0.05,
        disorder=0.2,
        bad=0.02,
        partitions=2,
        seed=62,
        topics={role: names[role] for role in ROLES},
    )
    produce(cfg, proxy.address, client_config=client)
    create_topics(proxy.address, client, {names[o]: 1 for o in OUTPUTS})

    before = dict(proxy.counts)
    config = write_config(tmp_path / "sferp.toml", names, kafka)
    r, _ = sferp_run(config, proxy.address, tmp_path / "views.duckdb")
    assert r.returncode == 0, r.stderr[-3000:]
    after = dict(proxy.counts)
    logins = after.get("sasl_ok", 0) - before.get("sasl_ok", 0)
    assert logins >= 2 and logins == after.get("tls", 0) - before.get("tls", 0)
    assert after.get("sasl_failed", 0) == before.get("sasl_failed", 0)
    assert after.get("sasl_skipped", 0) == before.get("sasl_skipped", 0)

    views = load_views(tmp_path / "views.duckdb")
    ref_cfg = ReferenceConfig(topics={names[r]: REF_ROLE[r] for r in ROLES})
    assert diff(compute(generated_messages(cfg), ref_cfg), views) == []
    assert "eyJ.token.one" not in r.stderr + r.stdout


def test_a_rotated_token_file_is_used_without_a_restart(sasl, pki, tmp_path):
    proxy, gate = sasl
    topic = f"rot.{tmp_path.name[-10:]}"
    token = tmp_path / "token"
    token.write_text("eyJ.token.one")
    client = load_settings(
        environ={}, overrides={"kafka": oauth_kafka(pki, token)}
    ).kafka_client_config()
    create_topics(proxy.address, client, {topic: 1})
    assert list_partitions(proxy.address, [topic], client) == [(topic, 0)]
    gate.tokens.add("eyJ.token.two")
    gate.tokens.discard("eyJ.token.one")  # the identity provider rotated the token...
    try:
        with pytest.raises(KafkaConnectorError, match="SASL OAUTHBEARER login") as e:
            list_partitions(proxy.address, [topic], client)
        assert "eyJ" not in str(e.value)
        token.write_text("eyJ.token.two\n")  # ...and the sidecar rewrote the file
        assert list_partitions(proxy.address, [topic], client) == [(topic, 0)]
    finally:
        gate.tokens.add("eyJ.token.one")


def test_plain_password_is_checked_and_never_shown(sasl, pki, tmp_path):
    proxy, _ = sasl
    topic = f"plain.{tmp_path.name[-10:]}"
    kafka = {
        "security_protocol": "SASL_SSL",
        "ssl_cafile": str(pki.ca),
        "sasl_mechanism": "PLAIN",
        "sasl_username": SASL_USER,
    }
    pw = tmp_path / "pw"
    pw.write_text(SASL_PASSWORD + "\n")
    good = load_settings(environ={}, overrides={"kafka": {**kafka, "sasl_password_file": str(pw)}})
    create_topics(proxy.address, good.kafka_client_config(), {topic: 3})
    assert len(list_partitions(proxy.address, [topic], good.kafka_client_config())) == 3
    bad = load_settings(
        environ={"SFERP_KAFKA__SASL_PASSWORD": "wrong-" + SASL_PASSWORD},
        overrides={"kafka": kafka},
    )
    failed = proxy.counts.get("sasl_failed", 0)
    with pytest.raises(KafkaConnectorError, match="SASL PLAIN login: check kafka.sasl_username"):
        list_partitions(proxy.address, [topic], bad.kafka_client_config())
    assert proxy.counts["sasl_failed"] > failed
    assert SASL_PASSWORD not in json.dumps(good.redacted()) + json.dumps(bad.redacted())


# --- settings: TLS ---------------------------------------------------------------------------


def test_plaintext_is_the_default_and_passes_nothing_else():
    assert load_settings(environ={}).kafka_client_config() == {"security_protocol": "PLAINTEXT"}


def test_tls_settings_are_checked_by_loading_them(pki, tmp_path):
    cfg = tls_settings(pki).kafka_client_config()
    assert cfg == {
        "security_protocol": "SSL",
        "ssl_cafile": str(pki.ca),
        "ssl_check_hostname": True,
    }
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    bad = [
        ({"ssl_cafile": str(tmp_path / "absent.pem")}, "kafka.ssl_cafile: cannot read"),
        ({"ssl_cafile": str(garbage)}, "kafka.ssl_cafile"),
        ({"ssl_keyfile": str(pki.client_key)}, "kafka.ssl_keyfile: set without kafka.ssl_certfile"),
        ({"ssl_certfile": str(pki.client_cert)}, "kafka.ssl_certfile"),  # key missing
        (
            {"ssl_certfile": str(pki.client_cert), "ssl_keyfile": str(pki.client_key)},
            "kafka.ssl_certfile",  # encrypted key, no passphrase
        ),
    ]
    for kafka, needle in bad:
        with pytest.raises(ConfigError) as e:
            tls_settings(pki, **kafka).kafka_client_config()
        assert needle in str(e.value) and "\n" not in str(e.value), (kafka, e.value)


def test_wrong_key_passphrase_is_a_config_error_that_does_not_show_it(pki, tmp_path):
    kafka = {"ssl_certfile": str(pki.client_cert), "ssl_keyfile": str(pki.client_key)}
    s = load_settings(
        environ={"SFERP_KAFKA__SSL_PASSWORD": "hunter2-wrong"},
        overrides={"kafka": {"security_protocol": "SSL", "ssl_cafile": str(pki.ca), **kafka}},
    )
    with pytest.raises(ConfigError) as e:
        s.kafka_client_config()
    assert "kafka.ssl_certfile" in str(e.value) and "hunter2" not in str(e.value)
    pw = tmp_path / "pw"
    pw.write_text(CLIENT_KEY_PASSWORD + "\n")
    s = load_settings(
        environ={},
        overrides={
            "kafka": {"security_protocol": "SSL", "ssl_password_file": str(pw), **kafka},
        },
    )
    assert s.kafka_client_config()["ssl_password"] == CLIENT_KEY_PASSWORD


@pytest.mark.parametrize("protocol", ["PLAINTEXT", "SASL_PLAINTEXT"])
def test_tls_files_without_tls_are_refused(pki, protocol):
    """A CA file with a plaintext protocol would silently mean: no TLS at all."""
    s = load_settings(
        environ={"SFERP_KAFKA__SASL_PASSWORD": "x"},
        overrides={
            "kafka": {
                "security_protocol": protocol,
                "ssl_cafile": str(pki.ca),
                "sasl_mechanism": "PLAIN" if protocol.startswith("SASL") else "",
                "sasl_username": "u",
            }
        },
    )
    with pytest.raises(ConfigError, match=f"kafka.ssl_cafile: set, but .* is {protocol}"):
        s.kafka_client_config()


def test_tls_settings_from_the_environment():
    s = load_settings(
        environ={
            "SFERP_KAFKA__SECURITY_PROTOCOL": "SSL",
            "SFERP_KAFKA__SSL_CHECK_HOSTNAME": "false",
        }
    )
    assert s.kafka_client_config() == {"security_protocol": "SSL", "ssl_check_hostname": False}


# --- settings: SASL --------------------------------------------------------------------------

SECRET = "s3cr3t-Pa55-xyzzy"


def first_sasl_message(cfg: dict) -> bytes:
    """What kafka-python sends first in the SASL exchange with these settings."""
    mechanism = get_sasl_mechanism(cfg["sasl_mechanism"])(**cfg)
    return mechanism.auth_bytes()


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
@pytest.mark.parametrize("source", ["env", "file"])
def test_password_mechanisms(tmp_path, mechanism, source):
    kafka = {"security_protocol": "SASL_SSL", "sasl_mechanism": mechanism, "sasl_username": "svc"}
    env = {}
    if source == "env":
        env["SFERP_KAFKA__SASL_PASSWORD"] = SECRET
    else:
        (tmp_path / "pw").write_text(SECRET + "\n")
        kafka["sasl_password_file"] = str(tmp_path / "pw")
    s = load_settings(environ=env, overrides={"kafka": kafka})
    cfg = s.kafka_client_config()
    assert cfg["sasl_mechanism"] == mechanism
    assert (cfg["sasl_plain_username"], cfg["sasl_plain_password"]) == ("svc", SECRET)
    first = first_sasl_message(cfg)
    if mechanism == "PLAIN":
        assert first == b"svc\0svc\0" + SECRET.encode()  # authzid, authcid, password
    else:  # SCRAM's client-first message names the user and never the password
        assert b"n=svc," in first and SECRET.encode() not in first
    assert SECRET not in json.dumps(s.redacted()) and SECRET not in repr(s)


def test_oauthbearer_token_file_is_read_at_every_login(tmp_path):
    token = tmp_path / "token"
    token.write_text("eyJ.first.token\n")
    s = load_settings(
        environ={},
        overrides={
            "kafka": {
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "OAUTHBEARER",
                "sasl_oauth_token_file": str(token),
            }
        },
    )
    cfg = s.kafka_client_config()
    assert isinstance(cfg["sasl_oauth_token_provider"], FileTokenProvider)
    assert b"auth=Bearer eyJ.first.token\x01" in first_sasl_message(cfg)
    token.write_text("eyJ.rotated.token")  # rotation by a sidecar: no restart
    assert b"auth=Bearer eyJ.rotated.token\x01" in first_sasl_message(cfg)
    assert "eyJ" not in repr(cfg["sasl_oauth_token_provider"])
    token.write_text("")
    with pytest.raises(TokenUnavailable, match="kafka.sasl_oauth_token_file: .* is empty"):
        first_sasl_message(cfg)


def test_oauthbearer_token_from_the_environment_is_hidden():
    env = {
        "SFERP_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "SFERP_KAFKA__SASL_MECHANISM": "OAUTHBEARER",
        "SFERP_KAFKA__SASL_OAUTH_TOKEN": SECRET,
    }
    s = load_settings(environ=env)
    cfg = s.kafka_client_config()
    assert f"auth=Bearer {SECRET}\x01".encode() in first_sasl_message(cfg)
    assert SECRET not in repr(cfg) and SECRET not in json.dumps(s.redacted())


@pytest.mark.parametrize(
    "kafka, env, needle",
    [
        ({"security_protocol": "SASL_SSL"}, {}, "kafka.sasl_mechanism: required"),
        ({"sasl_mechanism": "PLAIN"}, {}, "kafka.sasl_mechanism: set to PLAIN, but"),
        # Credentials with a protocol that does not authenticate: unauthenticated otherwise.
        ({"sasl_username": "u"}, {}, "kafka.sasl_username: set, but kafka.security_protocol"),
        (
            {"security_protocol": "SSL"},
            {"SFERP_KAFKA__SASL_PASSWORD": SECRET},
            "SFERP_KAFKA__SASL_PASSWORD: set, but kafka.security_protocol is SSL",
        ),
        ({"sasl_password_file": "/x"}, {}, "kafka.sasl_password_file: set, but"),
        ({}, {"SFERP_KAFKA__SASL_OAUTH_TOKEN": SECRET}, "SFERP_KAFKA__SASL_OAUTH_TOKEN: set, but"),
        ({"sasl_oauth_token_file": "/x"}, {}, "kafka.sasl_oauth_token_file: set, but"),
        (
            {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512"},
            {"SFERP_KAFKA__SASL_PASSWORD": SECRET},
            "kafka.sasl_username and SFERP_KAFKA__SASL_PASSWORD",
        ),
        (
            {"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_username": "u"},
            {},
            "kafka.sasl_username and SFERP_KAFKA__SASL_PASSWORD",
        ),
        (
            {"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER"},
            {},
            "kafka.sasl_oauth_token_file (or SFERP_KAFKA__SASL_OAUTH_TOKEN): required",
        ),
        (
            {
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "OAUTHBEARER",
                "sasl_oauth_token_file": "/nonexistent/token",
            },
            {},
            "kafka.sasl_oauth_token_file: cannot read /nonexistent/token",
        ),
        (
            {"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER"},
            {"SFERP_KAFKA__SASL_OAUTH_TOKEN": SECRET, "SFERP_KAFKA__SASL_PASSWORD": SECRET},
            "kafka.sasl_password: not used with SASL OAUTHBEARER",
        ),
        (
            {"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_username": "u"},
            {"SFERP_KAFKA__SASL_PASSWORD": SECRET, "SFERP_KAFKA__SASL_OAUTH_TOKEN": SECRET},
            "only used with sasl_mechanism OAUTHBEARER, not PLAIN",
        ),
    ],
)
def test_bad_sasl_combinations_name_the_setting(kafka, env, needle):
    s = load_settings(environ=env, overrides={"kafka": kafka})
    with pytest.raises(ConfigError) as e:
        s.kafka_client_config()
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and SECRET not in msg


def test_secrets_are_refused_in_the_config_file(tmp_path):
    for key in ("sasl_password", "sasl_oauth_token", "ssl_password"):
        f = tmp_path / "sferp.toml"
        f.write_text(f'[kafka]\n{key} = "{SECRET}"\n')
        with pytest.raises(ConfigError) as e:
            load_settings(f, environ={})
        assert f"kafka.{key}: secrets are not read from the config file" in str(e.value)
        assert SECRET not in str(e.value)


def test_cli_bad_combination_exits_2_with_one_line_and_no_secret(tmp_path):
    f = tmp_path / "sferp.toml"
    f.write_text('[kafka]\nsecurity_protocol = "SASL_SSL"\nsasl_mechanism = "PLAIN"\n')
    env = {**os.environ, "SFERP_KAFKA__SASL_PASSWORD": SECRET}
    r = subprocess.run(
        [sys.executable, "-m", "sferp", "run", "--config", str(f), "--until-caught-up"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "kafka.sasl_username" in lines[0]
    assert SECRET not in r.stderr + r.stdout


def test_secret_never_reaches_the_logs(caplog, tmp_path):
    """Failing to reach Kafka with SASL settings: the log lines and the error hold no secret."""
    s = load_settings(
        environ={"SFERP_KAFKA__SASL_PASSWORD": SECRET},
        overrides={
            "kafka": {
                "bootstrap": f"127.0.0.1:{free_port()}",
                "security_protocol": "SASL_PLAINTEXT",
                "sasl_mechanism": "PLAIN",
                "sasl_username": "svc",
            }
        },
    )
    caplog.set_level(logging.DEBUG)
    with pytest.raises(KafkaConnectorError) as e:
        list_partitions(s.kafka.bootstrap, ["t"], s.kafka_client_config())
    assert SECRET not in str(e.value)
    assert caplog.records, "kafka-python logged its attempts"
    assert all(SECRET not in r.getMessage() for r in caplog.records)
    logging.getLogger().info("settings: %s", s.redacted())
    assert SECRET not in caplog.text
