"""docker-compose.yml and the Dockerfile, checked without a Docker engine.

The compose file is validated against the Compose Specification JSON schema
(tests/data/compose-spec.json, see tests/data/README.md), and its sferp services
are checked against the real command line, settings and metrics ports: each
`command` parses with `sferp run`'s own parser, the cluster addresses agree, each
process publishes and Prometheus scrapes 9464 + its process id, and every worker
mounts the shared recovery volume at its --recovery-dir.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from sferp.cli import run_parser
from sferp.config import TopicSettings, load_settings

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((Path(__file__).parent / "data" / "compose-spec.json").read_text())


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def validator():
    return jsonschema.Draft202012Validator(SCHEMA)


def workers(compose):
    """The sferp processes: (service name, service, parsed `sferp run` arguments), by -i."""
    out = []
    for name, svc in compose["services"].items():
        cmd = svc.get("command")
        if isinstance(cmd, list) and cmd and cmd[0] == "run":
            out.append((name, svc, run_parser().parse_args(cmd[1:])))
    return sorted(out, key=lambda w: w[2].process_id)


def mounts(svc):
    """Container path -> source (named volume or host path) of a service's volumes."""
    out = {}
    for v in svc.get("volumes", []):
        parts = v.split(":")
        out[parts[1]] = parts[0]
    return out


def published(svc):
    """Published container ports of a service (short syntax, optionally host-IP bound)."""
    ports = set()
    for p in svc.get("ports", []):
        host, _, container = str(p).rpartition(":")
        assert host, f"port {p!r}: publish with an explicit host port"
        ports.add(int(container))
    return ports


def test_compose_file_is_valid_against_the_compose_specification(compose):
    errors = sorted(validator().iter_errors(compose), key=lambda e: e.path)
    assert [e.message for e in errors] == []
    # the check can fail: a misspelled key and a wrong type are reported
    broken = copy.deepcopy(compose)
    broken["services"]["sferp-0"]["comand"] = "run"
    broken["services"]["sferp-1"]["ports"] = 9465
    assert len(list(validator().iter_errors(broken))) >= 2


def test_workers_form_one_cluster_with_the_cli_flags(compose):
    ws = workers(compose)
    assert len(ws) >= 2
    ids = [args.process_id for _, _, args in ws]
    assert ids == list(range(len(ws)))
    addresses = {args.addresses for _, _, args in ws}
    assert len(addresses) == 1, "every process must be given the same -a list"
    hosts = addresses.pop().split(";")
    assert len(hosts) == len(ws)
    for (name, svc, _args), address in zip(ws, hosts, strict=True):
        host, _, port = address.rpartition(":")
        assert host in (name, svc.get("hostname")), f"{name} listens as {address}"
        assert port.isdigit()


def test_each_process_serves_and_publishes_its_own_metrics_port(compose):
    ws = workers(compose)
    ports = {}
    for name, svc, args in ws:
        settings = load_settings(environ={k: str(v) for k, v in svc["environment"].items()})
        ports[name] = settings.metrics.port + args.process_id
        assert settings.metrics.bind == "0.0.0.0", f"{name}: Prometheus must reach it"
        assert published(svc) == {ports[name]}, f"{name} must publish {ports[name]}"
    assert sorted(ports.values()) == [9464 + i for i in range(len(ws))]
    # Prometheus scrapes every process at its port, under the job the alerts use
    prom = compose["services"]["prometheus"]
    config_src = mounts(prom)["/etc/prometheus/prometheus.yml"]
    config = yaml.safe_load((ROOT / config_src).read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = {t for sc in jobs["sferp"]["static_configs"] for t in sc["targets"]}
    assert targets == {f"{name}:{port}" for name, port in ports.items()}
    for rule_file in config.get("rule_files", []):
        assert f"/etc/prometheus/{rule_file}" in mounts(prom), f"{rule_file} is not mounted"
    # the cluster port and the metrics ports never collide
    cluster_ports = {int(a.addresses.split(";")[a.process_id].rpartition(":")[2]) for *_, a in ws}
    assert not cluster_ports & set(ports.values())


def test_recovery_is_shared_and_views_live_with_process_0(compose):
    ws = workers(compose)
    volumes = compose["volumes"]
    sources = set()
    for name, svc, args in ws:
        assert args.recovery_dir, f"{name} runs without a recovery store"
        source = mounts(svc).get(args.recovery_dir)
        assert source in volumes, f"{name}: {args.recovery_dir} is not on a named volume"
        sources.add(source)
        assert svc.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert len(sources) == 1, "all processes must share one recovery volume"
    views = Path(load_settings(environ=dict(ws[0][1]["environment"])).views.path)
    assert mounts(ws[0][1]).get(str(views.parent)) in volumes, "the views must be on a volume"


def test_topics_job_creates_every_configured_topic(compose):
    script = "\n".join(compose["services"]["topics"]["command"])
    defaults = TopicSettings()
    for topic in [*defaults.input_roles(), *defaults.outputs()]:
        assert re.search(rf"(?<![\w.-]){re.escape(topic)}(?![\w.-])", script), topic
    compacted = re.search(r"for t in ([^;]+); do\s+create \"\$\$t\" [^\n]*compact", script)
    assert compacted, "the reconciled.* topics must be compacted"
    assert compacted.group(1).split() == [
        defaults.out_inventory,
        defaults.out_orders,
        defaults.out_exceptions,
    ]
    deps = [w[1]["depends_on"]["topics"]["condition"] for w in workers(compose)]
    assert deps == ["service_completed_successfully"] * len(deps)
    kafka = compose["services"]["kafka"]["environment"]
    assert "controller" in kafka["KAFKA_PROCESS_ROLES"], "Kafka runs in KRaft mode"
    assert all(
        w[1]["environment"]["SFERP_KAFKA__BOOTSTRAP"] == "kafka:9092" for w in workers(compose)
    )


def test_grafana_is_provisioned_from_the_monitoring_folder(compose):
    grafana = compose["services"]["grafana"]
    m = mounts(grafana)
    assert m["/etc/grafana/provisioning"] == "./monitoring/grafana/provisioning"
    assert m["/var/lib/grafana/dashboards"] == "./monitoring/grafana/dashboards"
    for name, svc in compose["services"].items():
        for source in mounts(svc).values():
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
    datasources = ROOT / "monitoring/grafana/provisioning/datasources"
    urls = [
        ds["url"]
        for f in datasources.glob("*.y*ml")
        for ds in yaml.safe_load(f.read_text()).get("datasources", [])
    ]
    assert "http://prometheus:9090" in urls


def test_alertmanager_gets_the_routing_and_prometheus_reaches_it(compose):
    am = compose["services"]["alertmanager"]
    m = mounts(am)
    assert m["/etc/alertmanager/alertmanager.yml"] == "./monitoring/alertmanager/alertmanager.yml"
    assert "--config.file=/etc/alertmanager/alertmanager.yml" in am["command"]
    assert published(am) == {9093}
    routing = yaml.safe_load((ROOT / "monitoring/alertmanager/alertmanager.yml").read_text())
    secrets = m["/etc/alertmanager/secrets"]
    for receiver in routing["receivers"]:
        for hook in receiver["webhook_configs"]:
            token = hook["http_config"]["authorization"]["credentials_file"]
            assert token.startswith("/etc/alertmanager/secrets/"), receiver["name"]
    # the mounted secrets folder exists and keeps its files out of the repository
    ignore = (ROOT / secrets.removeprefix("./") / ".gitignore").read_text().split()
    assert "*" in ignore
    prom = yaml.safe_load((ROOT / mounts(compose["services"]["prometheus"])[
        "/etc/prometheus/prometheus.yml"]).read_text())  # fmt: skip
    targets = [t for a in prom["alerting"]["alertmanagers"] for sc in a["static_configs"]
               for t in sc["targets"]]  # fmt: skip
    assert targets == ["alertmanager:9093"]


def test_dockerfile_runs_sferp_and_exposes_the_ports(compose):
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["sferp"\]', text, re.M)
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", text, re.M) for p in line.split()}
    for _, _, args in workers(compose):
        assert 9464 + args.process_id in exposed
        assert int(args.addresses.split(";")[args.process_id].rpartition(":")[2]) in exposed
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        for src in shlex.split(line)[:-1]:
            assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
    assert all(svc.get("build") == "." for _, svc, _ in workers(compose))
