"""The deployment files under deploy/ hold together (what can be checked on this machine).

There is no Docker engine, compose plugin, OpenTelemetry Collector, Jaeger or Grafana here,
so the stack is not started: these tests check what a typo would break. paddle-meter's own
configs (compose and Kubernetes) load through the real config loader (unknown keys,
auth-off-off-loopback and bad values fail there); every file the compose stack mounts
exists; every collector exporter's persistent queue names a declared file_storage
extension and the pipelines send traces to Jaeger and metrics to Prometheus; the
Kubernetes manifests render with the real ``kubectl kustomize`` and probe endpoints the
server serves; Grafana is provisioned with the dashboard the Prometheus tests evaluate.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from serving.config import load_config
from serving.tls import check_exposure

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("config", ["compose/paddle-meter.yaml", "k8s/paddle-meter.yaml"])
def test_paddle_meter_configs_load_and_may_listen_off_loopback(config):
    loaded = load_config(DEPLOY / config)
    check_exposure(loaded, warn=False)  # auth required: listening on 0.0.0.0 is allowed
    assert loaded["ledger"]["url"].startswith("postgresql://")
    assert "@" in loaded["ledger"]["url"] and ":" not in loaded["ledger"]["url"].split("@")[0][
        len("postgresql://"):], "no password in the file: PGPASSWORD carries it"


def test_compose_stack_mounts_what_exists_and_pins_images():
    compose = _yaml(DEPLOY / "compose" / "compose.yaml")
    services = compose["services"]
    assert set(services) == {"postgres", "paddle-meter", "otel-collector", "jaeger",
                             "prometheus", "grafana"}
    for name, service in services.items():
        image = service.get("image")
        if image is not None:
            assert re.search(r":v?\d", image), f"{name}: pin the image version, not {image}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / "compose" / source).resolve().exists(), f"{name}: {source}"
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"
    build = services["paddle-meter"]["build"]
    assert (DEPLOY / "compose" / build["context"] / build["dockerfile"]).resolve().is_file()
    env = services["paddle-meter"]["environment"]
    assert env["PADDLE_METER_AUTH_SECRET"].startswith("${") and env["PGPASSWORD"].startswith("${")
    assert "--enable-feature=otlp-write-receiver" in services["prometheus"]["command"]


def test_collector_queues_on_file_storage_and_routes_traces_and_metrics():
    config = _yaml(DEPLOY / "otel-collector" / "config.yaml")
    service = config["service"]
    storages = {name for name in config["extensions"] if name.startswith("file_storage")}
    assert storages and storages <= set(service["extensions"])
    for name, exporter in config["exporters"].items():
        queue = exporter["sending_queue"]
        assert queue["enabled"] and queue["storage"] in storages, name
    assert service["pipelines"]["traces"]["exporters"] == ["otlp/jaeger"]
    assert service["pipelines"]["metrics"]["exporters"] == ["otlphttp/prometheus"]
    assert config["exporters"]["otlp/jaeger"]["endpoint"] == "jaeger:4317"
    for pipeline in service["pipelines"].values():
        assert pipeline["receivers"] == ["otlp"] and "batch" in pipeline["processors"]
    assert set(config["receivers"]["otlp"]["protocols"]) == {"grpc", "http"}


def test_kubernetes_manifests_render_with_probes_on_real_endpoints():
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl missing"
    done = subprocess.run([kubectl, "kustomize", str(DEPLOY / "k8s")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    docs = {d["kind"]: d for d in yaml.safe_load_all(done.stdout)}
    assert set(docs) == {"ConfigMap", "Service", "Deployment"}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert docs["Deployment"]["spec"]["replicas"] >= 2
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"]
               if "valueFrom" in e}
    assert secrets == {"PADDLE_METER_AUTH_SECRET": "paddle-meter-secrets",
                       "PGPASSWORD": "paddle-meter-secrets"}
    config_map = pod["volumes"][0]["configMap"]["name"]
    assert config_map == docs["ConfigMap"]["metadata"]["name"]
    assert yaml.safe_load(docs["ConfigMap"]["data"]["config.yaml"])["auth"]["mode"] == "required"
    served = (Path(__file__).resolve().parents[1] / "serving" / "http_app.py").read_text()
    for probe in ("/v2/health/ready", "/v2/health/live"):
        assert f'@router.get("{probe}")' in served


def test_grafana_is_provisioned_with_the_tested_dashboard():
    sources = _yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "datasources.yaml")
    assert {s["type"] for s in sources["datasources"]} == {"prometheus", "jaeger"}
    providers = _yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "dashboards.yaml")
    path = providers["providers"][0]["options"]["path"]
    compose = _yaml(DEPLOY / "compose" / "compose.yaml")
    mounts = dict(v.rsplit(":", 2)[:2] for v in compose["services"]["grafana"]["volumes"])
    assert mounts["../grafana/dashboards"] == path
    assert (DEPLOY / "grafana" / "dashboards" / "paddle-meter.json").is_file()
