"""Configuration: file, environment and flag precedence; unknown keys and secrets."""

import re
import subprocess
import sys

import pytest

from sferp.config import ConfigError, load_settings


def write(tmp_path, text):
    p = tmp_path / "sferp.toml"
    p.write_text(text)
    return p


def test_defaults_match_contract():
    s = load_settings(environ={})
    assert s.kafka.bootstrap == "127.0.0.1:9092"
    assert s.topics.sf_cdc == "sf.cdc"
    assert s.topics.dlq == "integration.dlq"
    assert s.flow.dedup_window_s == 3600
    assert s.flow.allowed_lateness_s == 30
    assert s.flow.handoff_sla_s == 900
    assert s.flow.max_future_skew_s == 300
    assert s.flow.max_message_bytes == 1048576
    assert s.views.path == "data/views.duckdb"
    assert s.metrics.port == 9464
    assert s.metrics.bind == "127.0.0.1"
    assert s.salesforce.api_reserve_fraction == 0.2


def test_precedence_flags_over_env_over_file(tmp_path):
    f = write(
        tmp_path, '[kafka]\nbootstrap = "file:1"\nstart = "latest"\n[flow]\nhandoff_sla_s = 60\n'
    )
    env = {"SFERP_KAFKA__BOOTSTRAP": "env:2", "SFERP_FLOW__HANDOFF_SLA_S": "120"}
    s = load_settings(f, environ=env)
    assert s.kafka.bootstrap == "env:2"
    assert s.kafka.start == "latest"
    assert s.flow.handoff_sla_s == 120
    s = load_settings(f, environ=env, overrides={"kafka": {"bootstrap": "flag:3"}})
    assert s.kafka.bootstrap == "flag:3"


def test_env_list_setting():
    s = load_settings(environ={"SFERP_SALESFORCE__POLL_OBJECTS": "Order, OrderItem"})
    assert s.salesforce.poll_objects == ["Order", "OrderItem"]
    s = load_settings(environ={"SFERP_SALESFORCE__POLL_OBJECTS": '["Order", "Product2"]'})
    assert s.salesforce.poll_objects == ["Order", "Product2"]
    s = load_settings(environ={"SFERP_SECURITY__ENCRYPT_FIELDS": "[]"})
    assert s.security.encrypt_fields == []
    for bad in ('["Order", 3]', '["Order"', '[{"a": 1}]'):
        with pytest.raises(ConfigError, match="SFERP_SALESFORCE__POLL_OBJECTS: not a JSON list"):
            load_settings(environ={"SFERP_SALESFORCE__POLL_OBJECTS": bad})


@pytest.mark.parametrize(
    "text, needle",
    [
        ("[kafka]\nbootsrap = 'x:1'\n", "kafka.bootsrap"),
        ("[nonsense]\na = 1\n", "nonsense"),
        ("[flow]\ndedup_window_s = -1\n", "flow.dedup_window_s"),
        ("[kafka]\nstart = 'middle'\n", "kafka.start"),
        ("[kafka]\nbootstrap = 'no-port'\n", "kafka.bootstrap"),
        ("[views]\nmemory_limit_mb = 8\n", "views.memory_limit_mb"),
        ("[flow]\nlinger_ms = -5\n", "flow.linger_ms"),
        ("[flow]\nbackground_nice = 20\n", "flow.background_nice"),
        ("[flow]\nreturn_freed_memory = 'sometimes'\n", "flow.return_freed_memory"),
        ("[kafka]\nsasl_password = 'hunter2'\n", "kafka.sasl_password"),
        ("not toml [", "TOML"),
        # one role per topic: a DLQ on an input topic read its own records back forever
        ("[flow]\nsnapshot_interval_s = inf\n", "flow.snapshot_interval_s"),
        ("[flow]\nsnapshot_interval_s = 1e300\n", "flow.snapshot_interval_s"),
        ("[metrics]\npoll_interval_s = nan\n", "metrics.poll_interval_s"),
        ("[views]\nmemory_limit_mb = 99999999999999999\n", "views.memory_limit_mb"),
        ("[topics]\ndlq = 'sf.cdc'\n", "topics.dlq"),
        ("[topics]\nerp_items = 'sf.cdc'\n", "topics.erp_items"),
        ("[topics]\nout_exceptions = 'reconciled.orders'\n", "topics.out_exceptions"),
        ("[topics]\nout_orders = ''\n", "topics.out_orders"),
        (
            "[topics]\nsf_cdc = ''\nerp_items = ''\nerp_inventory = ''\nerp_sales_orders = ''\n",
            "nothing to read",
        ),
    ],
)
def test_bad_configuration_names_the_setting(tmp_path, text, needle):
    with pytest.raises(ConfigError) as e:
        load_settings(write(tmp_path, text), environ={})
    msg = str(e.value)
    assert needle in msg
    assert "\n" not in msg
    assert "hunter2" not in msg


def test_unknown_env_key_is_an_error():
    with pytest.raises(ConfigError, match="SFERP_FLOW__NOPE"):
        load_settings(environ={"SFERP_FLOW__NOPE": "1"})


def test_secrets_from_env_or_file_never_in_dump(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("s3cret-file\n")
    f = write(
        tmp_path,
        "[kafka]\nsecurity_protocol = 'SASL_SSL'\nsasl_mechanism = 'SCRAM-SHA-512'\n"
        f"sasl_username = 'svc'\nsasl_password_file = '{pw}'\n",
    )
    s = load_settings(f, environ={})
    cfg = s.kafka_client_config()
    assert cfg["sasl_plain_password"] == "s3cret-file"
    assert cfg["sasl_mechanism"] == "SCRAM-SHA-512"
    s = load_settings(f, environ={"SFERP_KAFKA__SASL_PASSWORD": "s3cret-env"})
    assert s.kafka_client_config()["sasl_plain_password"] == "s3cret-env"
    assert "s3cret" not in repr(s.redacted())
    assert "s3cret" not in repr(s)


def test_sasl_without_password_is_a_config_error():
    s = load_settings(
        environ={
            "SFERP_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "SFERP_KAFKA__SASL_MECHANISM": "PLAIN",
        }
    )
    with pytest.raises(ConfigError, match="sasl"):
        s.kafka_client_config()


@pytest.mark.parametrize("kind", ["directory", "not utf-8"])
def test_a_config_file_that_cannot_be_read_is_a_config_error(tmp_path, kind):
    path = tmp_path / "sferp.toml"
    if kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"\xff\xfe[flow]\n")
    with pytest.raises(ConfigError, match="--config") as e:
        load_settings(path, environ={})
    assert "\n" not in str(e.value)


def test_a_secret_file_that_is_not_text_is_named_and_not_shown(tmp_path):
    secret = tmp_path / "pw"
    secret.write_bytes(b"\xffhunter2")
    s = load_settings(
        environ={
            "SFERP_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "SFERP_KAFKA__SASL_MECHANISM": "PLAIN",
            "SFERP_KAFKA__SASL_USERNAME": "svc",
            "SFERP_KAFKA__SASL_PASSWORD_FILE": str(secret),
        }
    )
    with pytest.raises(ConfigError, match="kafka.sasl_password_file") as e:
        s.kafka_client_config()
    assert "hunter2" not in str(e.value)


def test_cli_bad_config_exits_2_with_one_line(tmp_path):
    f = write(tmp_path, "[flow]\nunknown_knob = 3\n")
    r = subprocess.run(
        [sys.executable, "-m", "sferp", "run", "--config", str(f), "--until-caught-up"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "flow.unknown_knob" in lines[0]


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["no-such-command"],
        ["query"],
        ["query", "SELECT 1", "--format", "xml"],
        ["demo", "--orders", "many"],
        ["forget"],
        ["decrypt"],
        ["rekey", "--bogus"],
        ["run", "--bogus"],
        ["broker", "--port", "x"],
        ["generate"],
        ["plan"],
        ["bench", "--bogus"],
        ["query", "SELECT 1", "--timeout", "inf"],
        ["query", "SELECT 1", "--timeout", "nan"],
        ["query", "SELECT 1", "--timeout", "0"],
        ["query", "SELECT 1", "--max-rows", "99999999999999999999"],
        ["query", "SELECT 1", "--max-rows", "0"],
        ["decrypt", "SELECT 1", "--timeout", "-1"],
        ["broker", "--port", "99999"],
        ["demo", "--orders", "-5"],
        ["run", "-i", "0", "-a", "notanaddr"],
    ],
)
def test_every_usage_error_is_one_line_and_exit_2(argv):
    """CONTRACT §4: exit 2 for bad usage, with a one-line message naming the problem."""
    r = subprocess.run(
        [sys.executable, "-m", "sferp", *argv], capture_output=True, text=True, timeout=60
    )
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, (argv, r.stderr)
    assert lines[0].startswith("sferp") and "usage:" not in lines[0], lines[0]


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--views", "{dir}"], "views.path: {dir} is a directory"),
        (["--views", "{file}/views.duckdb"], "views.path: cannot write"),
        (["--views", ""], "views.path"),
        (["--bootstrap", ""], "kafka.bootstrap"),
        (["--bootstrap", "127.0.0.1:99999"], "kafka.bootstrap"),
        (["-i", "0", "-a", "127.0.0.1:7000;notanaddr"], "-a/--addresses"),
    ],
)
def test_run_refuses_unusable_flags_before_it_starts(tmp_path, extra, needle):
    """One line and exit 2 before the dataflow starts (a views file that cannot be opened
    failed inside it, as a Rust panic with a backtrace, once messages were read)."""
    (tmp_path / "a-file").write_text("x")
    subs = {"dir": str(tmp_path), "file": str(tmp_path / "a-file")}
    argv = [a.format(**subs) for a in extra]
    r = subprocess.run(
        [sys.executable, "-m", "sferp", "run", "--until-caught-up", *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert needle.format(**subs) in lines[0]


def test_version():
    r = subprocess.run(
        [sys.executable, "-m", "sferp", "--version"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and re.fullmatch(r"sferp \d+\.\d+\.\d+\S*\n", r.stdout), r.stdout


def test_cli_usage_errors_exit_2():
    r = subprocess.run(
        [sys.executable, "-m", "sferp", "run", "-i", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "addresses" in r.stderr


def test_the_one_line_error_is_sferps_own_message_not_what_it_hides():
    """`raise ... from None` ends the chain: the line named a ConnectionRefusedError
    where sferp had said which Salesforce it could not reach."""
    from sferp.cli import _root_message

    def hidden() -> None:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except OSError:
            raise RuntimeError("cannot reach Salesforce at https://x.example") from None

    try:
        hidden()
    except RuntimeError as e:
        line = _root_message(e)
    assert "cannot reach Salesforce at https://x.example" in line and "refused" not in line
    try:  # an explicit cause is still followed to its root
        try:
            raise ValueError("the root")
        except ValueError as inner:
            raise RuntimeError("wrapper") from inner
    except RuntimeError as e:
        assert "the root" in _root_message(e)


def test_a_views_file_another_process_writes_is_refused_before_the_flow_starts(tmp_path):
    """Before, the second run read Kafka for a while, then failed on DuckDB's lock."""
    import duckdb

    views = tmp_path / "views.duckdb"
    holder = duckdb.connect(str(views))  # as a running writer holds it
    try:
        r = subprocess.run(
            [sys.executable, "-m", "sferp", "run", "--until-caught-up", "--views", str(views)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        holder.close()
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert "views.path:" in lines[0] and "is in use by another process" in lines[0]
    assert "Traceback" not in r.stderr and "kafka" not in lines[0].lower()
