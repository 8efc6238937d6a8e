"""Kubernetes manifests: the real `kubectl kustomize` build, validated offline by kubernetes-validate
--strict, plus the properties the services rely on (headless model Service, GPU scheduling, probes,
grace periods)."""

from __future__ import annotations

import re
import subprocess
from functools import cache
from typing import Any

import pytest
import yaml

from bench.gpu.plan import GPU_SERVING
from tests.helpers.env import REPO, require_binary

K8S = REPO / "deploy" / "k8s"
# The oldest Kubernetes the manifests target (autoscaling/v2, policy/v1, ...) and the newest bundled schema.
K8S_VERSIONS = ("1.30.0", "1.37.0")


@cache
def build() -> str:
    out = subprocess.run(
        [require_binary("kubectl"), "kustomize", str(K8S)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def validate(manifests: str, version: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_binary("kubernetes-validate"), "--strict", "--quiet", "-k", version, "-"],
        input=manifests,
        capture_output=True,
        text=True,
        timeout=120,
    )


@cache
def objects() -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(build()) if o}


def obj(kind: str, name: str) -> dict[str, Any]:
    for (k, n), o in objects().items():
        if k == kind and (n == name or re.fullmatch(rf"{name}-[a-z0-9]{{10}}", n)):
            return o
    raise KeyError((kind, name))


def pod_spec(kind: str, name: str) -> dict[str, Any]:
    return obj(kind, name)["spec"]["template"]["spec"]


def container(kind: str, name: str) -> dict[str, Any]:
    return pod_spec(kind, name)["containers"][0]


def env_of(kind: str, name: str) -> dict[str, Any]:
    c = container(kind, name)
    merged: dict[str, Any] = {}
    for source in c.get("envFrom", []):
        merged |= obj("ConfigMap", source["configMapRef"]["name"])["data"]
    merged |= {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}
    return merged


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kustomize_build_validates_strictly(version: str) -> None:
    out = validate(build(), version)
    assert out.returncode == 0, out.stdout + out.stderr


def test_validation_rejects_a_misspelt_field() -> None:
    broken = build().replace("limits:", "limts:", 1)
    assert validate(broken, K8S_VERSIONS[0]).returncode != 0


def test_model_service_is_headless_and_the_api_uses_it() -> None:
    svc = obj("Service", "model-headless")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True  # draining owners stay reachable
    assert env_of("Deployment", "api")["MODEL_SERVICE_URL"] == "http://model-headless:8001"


def test_model_decodes_with_the_settings_the_gpu_check_measures() -> None:
    env = env_of("Deployment", "model")
    assert {name: env[name] for name, _ in GPU_SERVING} == dict(GPU_SERVING)


def test_model_runs_on_gpu_nodes_with_probes_and_shm() -> None:
    spec = pod_spec("Deployment", "model")
    c = container("Deployment", "model")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["nodeSelector"]
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30 * 60  # a first download
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    cache_volume = next(v for v in spec["volumes"] if v["name"] == "hf-cache")
    assert obj("PersistentVolumeClaim", cache_volume["persistentVolumeClaim"]["claimName"])
    assert env_of("Deployment", "model")["HF_HOME"] == "/cache/huggingface"


def _prestop_seconds(kind: str, name: str) -> int:
    return int(container(kind, name)["lifecycle"]["preStop"]["exec"]["command"][1])


def test_grace_periods_cover_the_services_drain() -> None:
    model_grace = float(env_of("Deployment", "model")["SHUTDOWN_GRACE_SECONDS"])
    close_margin = 5  # services/model/__main__.py CLOSE_MARGIN_SECONDS
    assert pod_spec("Deployment", "model")["terminationGracePeriodSeconds"] >= (
        _prestop_seconds("Deployment", "model") + model_grace + close_margin
    )
    gunicorn = (REPO / "services" / "api" / "gunicorn.conf.py").read_text()
    graceful = int(re.search(r"^graceful_timeout = (\d+)", gunicorn, re.M).group(1))
    assert pod_spec("Deployment", "api")["terminationGracePeriodSeconds"] > (
        _prestop_seconds("Deployment", "api") + graceful
    )


def test_api_scales_and_keeps_capacity() -> None:
    hpa = obj("HorizontalPodAutoscaler", "api")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "api"}
    assert hpa["spec"]["minReplicas"] >= 2
    pdb = obj("PodDisruptionBudget", "api")
    selector = obj("Deployment", "api")["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["selector"]["matchLabels"] == selector


def test_services_are_scraped_but_the_edge_is_not() -> None:
    for name, port in (("model", "8001"), ("api", "8000")):
        annotations = obj("Deployment", name)["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == port
        assert annotations["prometheus.io/path"] == "/metrics"


def test_every_pod_runs_non_root_with_limits() -> None:
    for (kind, name), o in objects().items():
        if kind not in {"Deployment", "StatefulSet"}:
            continue
        spec = o["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        for c in spec["containers"]:
            assert c["resources"]["limits"]["memory"], name
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert "readinessProbe" in c and "livenessProbe" in c, name


def test_secret_and_config_references_resolve() -> None:
    secret = obj("Secret", "qwen3vl-secrets")
    keys = set(secret["stringData"])
    for key in ("API_KEYS", "INTERNAL_TOKEN", "POSTGRES_PASSWORD", "DATABASE_URL"):
        assert "change-me" in secret["stringData"][key], "example values only"
    for (kind, name), o in objects().items():
        if kind not in {"Deployment", "StatefulSet"}:
            continue
        for c in o["spec"]["template"]["spec"]["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "qwen3vl-secrets" and ref["key"] in keys, (name, ref)
            for source in c.get("envFrom", []):
                assert (
                    "ConfigMap",
                    source["configMapRef"]["name"],
                ) in objects(), (name, source)


def _allowed_from(component: str) -> list[dict[str, Any]]:
    rules = []
    for (kind, _), o in objects().items():
        if (
            kind == "NetworkPolicy"
            and o["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/component")
            == component
        ):
            rules += o["spec"].get("ingress", [])
    return rules


def test_network_policies_allow_only_the_designed_paths() -> None:
    deny = obj("NetworkPolicy", "default-deny-ingress")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}

    def sources(component: str) -> set[str]:
        found = set()
        for rule in _allowed_from(component):
            for peer in rule.get("from", [{"anyone": True}]):
                labels = peer.get("podSelector", {}).get("matchLabels", {})
                name = labels.get("app.kubernetes.io/component") or labels.get("app.kubernetes.io/name")
                found.add(name or "*")
        return found

    assert sources("edge") == {"*"}
    assert sources("api") == {"edge", "prometheus"}
    assert sources("model") == {"api", "prometheus"}
    assert sources("postgres") == {"api"}
