"""deploy/k8s and deploy/docker, checked with no cluster, no network and no Docker engine.

Every overlay is rendered (tests/deploy/kustomize.py; compared with ``kubectl kustomize`` where
kubectl is installed) and every object is validated offline: built-in kinds against the
Kubernetes OpenAPI-derived JSON schemas that the ``kubernetes-validate`` package ships (strict
mode: unknown fields are errors), for the oldest and newest Kubernetes versions we support; the
two custom resources (KEDA ScaledObject, Prometheus Operator ServiceMonitor) against the minimal
schemas in tests/deploy/schemas/, written for the fields we use. Then the invariants a reviewer
would otherwise check by eye, several of them against the code's own constants (settings names,
queue key names, body and timeout limits).
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from edge_client.protocol import MAX_BODY_BYTES
from gateway.config import GatewaySettings, WorkerSettings, key_digest
from gateway.queue.keys import GROUP, Keys
from gateway.worker.__main__ import served_name

from .kustomize import object_id, render

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DOCKER = ROOT / "deploy" / "docker"
SCHEMAS = Path(__file__).parent / "schemas"
NAMESPACE = "vqa"
# Oldest Kubernetes the manifests claim (base/kustomization.yaml) and the newest the package knows.
K8S_VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())
# Everything `kubectl apply -k` can be pointed at: the overlays, plus the gpu overlay with the
# optional ServiceMonitor component.
VARIANTS = ("dev", "gpu", "gpu+servicemonitor")
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda-v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
}
OWN_IMAGES = "registry.example.com/llava-alignedvq/"
POD_KINDS = {"Deployment", "StatefulSet"}


def _variant_dir(variant: str) -> Path:
    if "+" not in variant:
        return K8S / "overlays" / variant
    # The gpu overlay plus an optional component: tests/deploy/variants/ (relative paths, as
    # kustomize refuses absolute ones).
    return Path(__file__).parent / "variants" / variant.replace("+", "-")


@functools.cache
def _rendered(variant: str) -> tuple[dict, ...]:
    return tuple(render(_variant_dir(variant)))


def objects(variant: str, kind: str | None = None) -> list[dict]:
    return [o for o in _rendered(variant) if kind is None or o["kind"] == kind]


def one(variant: str, kind: str, name: str) -> dict:
    (found,) = [o for o in objects(variant, kind) if o["metadata"]["name"] == name]
    return found


def config(variant: str) -> dict[str, str]:
    return one(variant, "ConfigMap", "vqa-config")["data"]


def pod_templates(variant: str) -> list[tuple[str, dict]]:
    return [
        (o["metadata"]["name"], o["spec"]["template"]) for o in objects(variant) if o["kind"] in POD_KINDS
    ]


def containers(variant: str) -> list[tuple[str, dict, dict]]:
    """(workload name, pod spec, container) for every container of every pod template."""
    return [
        (name, template["spec"], container)
        for name, template in pod_templates(variant)
        for container in template["spec"].get("initContainers", []) + template["spec"]["containers"]
    ]


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels selectors are used, got {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def pod_labels(variant: str, component: str) -> dict:
    (labels,) = [
        t["metadata"]["labels"]
        for _, t in pod_templates(variant)
        if t["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]
    return labels


def quantity_bytes(value: str) -> int:
    """nginx sizes ("17m") and Kubernetes quantities ("1Gi") -> bytes."""
    match = re.fullmatch(r"(\d+)(k|m|g|Ki|Mi|Gi)?", value)
    assert match, value
    units = {None: 1, "k": 1024, "m": 1024**2, "g": 1024**3, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}
    return int(match.group(1)) * units[match.group(2)]


# ---- rendering and schema validation ---------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_renders_with_unique_namespaced_objects(variant):
    rendered = objects(variant)
    ids = [object_id(o) for o in rendered]
    assert len(ids) == len(set(ids)), f"duplicate objects in {variant}"
    for obj in rendered:
        expected = "" if obj["kind"] == "Namespace" else NAMESPACE
        assert obj["metadata"].get("namespace", "") == expected, object_id(obj)


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_kubectl_kustomize(variant):
    """The pure-Python renderer gives what real kustomize (kubectl's built-in) gives."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; the renderer is checked against it where it is")
    result = subprocess.run(
        [kubectl, "kustomize", str(_variant_dir(variant))], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    real = {object_id(o): o for o in yaml.safe_load_all(result.stdout) if o}
    assert real == {object_id(o): o for o in objects(variant)}


@functools.cache
def _crd_validator(api_version: str, kind: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / CRD_SCHEMAS[(api_version, kind)]).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def validate(obj: dict, version: str) -> None:
    """Raise unless ``obj`` is valid for Kubernetes ``version`` (or our CRD schema)."""
    if (obj["apiVersion"], obj["kind"]) in CRD_SCHEMAS:
        _crd_validator(obj["apiVersion"], obj["kind"]).validate(obj)
        behavior = obj["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
        if behavior is not None:  # KEDA copies it into its HPA: check it as one
            hpa = {
                "apiVersion": "autoscaling/v2",
                "kind": "HorizontalPodAutoscaler",
                "metadata": {"name": "keda-hpa"},
                "spec": {
                    "scaleTargetRef": {"kind": "Deployment", "name": "x"},
                    "maxReplicas": 1,
                    "behavior": behavior,
                },
            }
            kubernetes_validate.validate(hpa, version, strict=True)
        return
    kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_object_validates(variant, version):
    for obj in objects(variant):
        try:
            validate(obj, version)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as exc:
            pytest.fail(f"{variant} {object_id(obj)} at {'.'.join(map(str, exc.path))}: {exc.message}")


def test_validation_is_not_vacuous():
    deployment = json.loads(json.dumps(one("gpu", "Deployment", "worker")))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment, K8S_VERSIONS[0])
    scaled = json.loads(json.dumps(one("gpu", "ScaledObject", "worker")))
    scaled["spec"]["triggers"][0]["metadata"]["lagCount"] = 32  # KEDA wants strings
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled, K8S_VERSIONS[0])
    scaled["spec"]["triggers"][0]["metadata"].update(lagCount="32", lagcount="5")  # a typo'd key
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled, K8S_VERSIONS[0])


def test_example_secret_holds_only_key_digests():
    (secret,) = yaml.safe_load_all((K8S / "base" / "secret.example.yaml").read_text())
    validate(secret, K8S_VERSIONS[0])
    assert set(secret["stringData"]) == {"VQA_API_KEYS"}
    for entry in secret["stringData"]["VQA_API_KEYS"].split(","):
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", entry), entry
        assert key_digest(entry) == entry


# ---- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_secrets_in_configmaps(variant):
    assert not objects(variant, "Secret"), "API keys are created out of band, never rendered"
    for configmap in objects(variant, "ConfigMap"):
        for key, value in configmap.get("data", {}).items():
            assert key != "VQA_API_KEYS"
            assert not re.search(r"password|secret|token|api_key", key, re.I), key
            assert not re.search(r"sha256:[0-9a-f]{64}|://[^/@\s]*:[^/@\s]*@", value), (
                f"{key} holds a credential"
            )
    (gateway,) = [c for name, _, c in containers(variant) if name == "gateway"]
    secret_refs = [e["secretRef"] for e in gateway["envFrom"] if "secretRef" in e]
    assert [ref["name"] for ref in secret_refs] == ["vqa-api-keys"]
    assert secret_refs[0].get("optional", False) == (variant == "dev"), "only dev may run without keys"


@pytest.mark.parametrize("variant", VARIANTS)
def test_configmap_holds_valid_settings(variant):
    """Every VQA_* key is a real setting, and both processes accept the values."""
    data = config(variant)
    kwargs = {key.removeprefix("VQA_").lower(): value for key, value in data.items()}
    assert all(key.startswith("VQA_") for key in data)
    known = set(GatewaySettings.model_fields) | set(WorkerSettings.model_fields)
    assert set(kwargs) <= known, f"unknown settings: {sorted(set(kwargs) - known)}"
    assert data["VQA_QUEUE"] == "redis"
    (example,) = yaml.safe_load_all((K8S / "base" / "secret.example.yaml").read_text())
    GatewaySettings(**kwargs, api_keys=example["stringData"]["VQA_API_KEYS"])
    WorkerSettings(**{k: v for k, v in kwargs.items() if k in WorkerSettings.model_fields})


def test_anonymous_access_only_in_dev():
    assert config("dev")["VQA_ALLOW_ANONYMOUS"] == "true"
    assert config("gpu")["VQA_ALLOW_ANONYMOUS"] == "false"
    (base_config,) = [
        o for o in render(K8S / "base") if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "vqa-config"
    ]
    assert base_config["data"]["VQA_ALLOW_ANONYMOUS"] == "false"


def test_overlays_serve_their_models():
    assert (config("dev")["VQA_MODEL"], config("dev")["VQA_DEVICE"]) == ("llava-mini-shapes", "cpu")
    assert (config("gpu")["VQA_MODEL"], config("gpu")["VQA_DEVICE"]) == ("llava-1.5-7b", "cuda")


# ---- pods: probes, resources, security, images -----------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_container_has_probes(variant):
    for name, _, container in containers(variant):
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert probe in container, f"{name}/{container['name']} has no {probe}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_worker_probes_use_vqa_worker_check(variant):
    (worker,) = [c for name, _, c in containers(variant) if name == "worker"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert worker[probe]["exec"]["command"] == ["vqa-worker", "--check"]
    startup = worker["startupProbe"]
    budget_s = startup["periodSeconds"] * startup["failureThreshold"]
    assert budget_s >= (1200 if "gpu" in variant else 300), "start-up must cover loading the model"


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_container_has_requests_and_limits(variant):
    for name, _, container in containers(variant):
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"].get(bound, {})), f"{name}: {bound}"


def test_gpu_workers_get_one_gpu_on_gpu_nodes():
    (name, pod, worker) = next(c for c in containers("gpu") if c[0] == "worker")
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    (dev_worker,) = [c for n, _, c in containers("dev") if n == "worker"]
    assert "nvidia.com/gpu" not in json.dumps(dev_worker["resources"])


def test_gpu_workers_load_from_the_hf_cache_volume_offline():
    (_, pod, worker) = next(c for c in containers("gpu") if c[0] == "worker")
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert env["HF_HUB_OFFLINE"] == "1"
    (mount,) = [m for m in worker["volumeMounts"] if m["mountPath"] == env["HF_HOME"]]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    claim = volume["persistentVolumeClaim"]["claimName"]
    assert one("gpu", "PersistentVolumeClaim", claim)


@pytest.mark.parametrize("variant", VARIANTS)
def test_pods_are_locked_down(variant):
    for name, pod, container in containers(variant):
        pod_security = pod["securityContext"]
        assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] > 0, name
        assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod.get("automountServiceAccountToken") is False, name
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False, name
        assert security["readOnlyRootFilesystem"] is True, name
        assert security["capabilities"] == {"drop": ["ALL"]}, name
        assert "privileged" not in security and "runAsUser" not in security, name
        (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == tmp["name"]]
        assert "emptyDir" in volume, f"{name}: /tmp must be a writable emptyDir"


@pytest.mark.parametrize("variant", VARIANTS)
def test_images_are_pinned(variant):
    for name, _, container in containers(variant):
        image = container["image"]
        reference, _, digest = image.partition("@")
        repository, _, tag = reference.rpartition(":")
        assert repository and "/" not in tag, f"{name}: {image} has no tag"
        assert tag != "latest" and re.match(r"\d+\.\d+\.\d+", tag), (
            f"{name}: {image} tag is not an exact version"
        )
        if not image.startswith(OWN_IMAGES):  # third-party images: by digest as well
            assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"{name}: {image} has no digest"
        assert container.get("imagePullPolicy") == "IfNotPresent"


# ---- scaling, disruption, shutdown -----------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_autoscaled_deployments_leave_replicas_to_the_autoscaler(variant):
    targets = {o["spec"]["scaleTargetRef"]["name"] for o in objects(variant, "HorizontalPodAutoscaler")}
    targets |= {o["spec"]["scaleTargetRef"]["name"] for o in objects(variant, "ScaledObject")}
    assert "gateway" in targets
    for deployment in objects(variant, "Deployment"):
        if deployment["metadata"]["name"] in targets:
            assert "replicas" not in deployment["spec"], "a fixed count would fight the autoscaler on apply"
    assert ("worker" in targets) == (variant != "dev")
    if variant == "dev":
        assert one("dev", "Deployment", "worker")["spec"]["replicas"] == 1


@pytest.mark.parametrize("variant", ["gpu", "gpu+servicemonitor"])
def test_keda_scales_workers_on_their_stream(variant):
    (scaled,) = objects(variant, "ScaledObject")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "worker"}
    assert spec["minReplicaCount"] >= 1, "scaling from zero would leave requests waiting for a model load"
    assert spec["maxReplicaCount"] >= spec["minReplicaCount"]
    settings = config(variant)
    stream = Keys(settings["VQA_KEY_PREFIX"]).stream(served_name(settings["VQA_MODEL"]))
    (redis_service,) = [s for s in objects(variant, "Service") if s["metadata"]["name"] == "redis"]
    address = (
        f"redis.{redis_service['metadata']['namespace']}.svc:{redis_service['spec']['ports'][0]['port']}"
    )
    triggers = spec["triggers"]
    assert {t["type"] for t in triggers} == {"redis-streams"}
    for trigger in triggers:
        assert trigger["metadata"]["stream"] == stream
        assert trigger["metadata"]["address"] == address
    (lag,) = [t["metadata"] for t in triggers if "lagCount" in t["metadata"]]
    assert lag["consumerGroup"] == GROUP
    assert int(lag["lagCount"]) >= int(settings["VQA_MAX_BATCH"])
    # The gateway answers 429 above VQA_MAX_BACKLOG entries: the backlog that takes KEDA to its
    # largest count must fit under it, or the last workers are never started.
    (length,) = [int(t["metadata"]["streamLength"]) for t in triggers if "streamLength" in t["metadata"]]
    assert spec["maxReplicaCount"] * min(length, int(lag["lagCount"])) <= int(settings["VQA_MAX_BACKLOG"])
    # One key may not take the whole backlog, nor be capped below one worker's batch.
    per_key = int(settings.get("VQA_MAX_IN_FLIGHT_PER_KEY", "256"))
    assert int(settings["VQA_MAX_BATCH"]) <= per_key < int(settings["VQA_MAX_BACKLOG"])


def test_gpu_batch_is_the_benchmarks_best():
    """VQA_MAX_BATCH of the gpu overlay is the batch at which the GPU benchmark peaked."""
    summary = json.loads((ROOT / "benchmarks" / "results" / "gpu_worker.json").read_text())["summary"]
    assert int(config("gpu")["VQA_MAX_BATCH"]) == summary["cloud_half_fused"]["best_batch"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_orphaned_entries_are_claimed_before_their_deadline(variant):
    """A killed worker's entries are claimed with at least half the default deadline left, not
    dropped as expired (which only a client retry would make good)."""
    settings = config(variant)
    assert 2 * int(settings["VQA_CLAIM_IDLE_MS"]) <= int(settings["VQA_REQUEST_TIMEOUT_MS"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_worker_shutdown_outlasts_a_batch(variant):
    pod = one(variant, "Deployment", "worker")["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= 60
    assert grace > int(config(variant)["VQA_CLAIM_IDLE_MS"]) / 1000, (
        "a batch may take up to VQA_CLAIM_IDLE_MS"
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_gateway_shutdown_outlasts_the_longest_request(variant):
    pod = one(variant, "Deployment", "gateway")["spec"]["template"]["spec"]
    (gateway,) = pod["containers"]
    pre_stop = gateway["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain_s = int(config(variant)["VQA_MAX_TIMEOUT_MS"]) / 1000
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + drain_s


@pytest.mark.parametrize("variant", VARIANTS)
def test_disruption_budgets_cover_every_workload(variant):
    budgets = objects(variant, "PodDisruptionBudget")
    for component in ("gateway", "worker", "redis"):
        labels = pod_labels(variant, component)
        assert [b for b in budgets if selects(b["spec"]["selector"], labels)], f"no PDB for {component}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_selectors_match_pods(variant):
    templates = [t["metadata"]["labels"] for _, t in pod_templates(variant)]
    for obj in objects(variant):
        if obj["kind"] in POD_KINDS:
            assert selects(obj["spec"]["selector"], obj["spec"]["template"]["metadata"]["labels"])
        elif obj["kind"] == "Service":
            selector = {"matchLabels": obj["spec"]["selector"]}
            assert any(selects(selector, t) for t in templates), object_id(obj)
        elif obj["kind"] in {"PodDisruptionBudget", "NetworkPolicy"}:
            selector = obj["spec"]["selector" if obj["kind"] == "PodDisruptionBudget" else "podSelector"]
            assert any(selects(selector, t) for t in templates), object_id(obj)


# ---- Redis -----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_redis_persists_with_aof_on_a_volume(variant):
    conf = one(variant, "ConfigMap", "redis-config")["data"]["redis.conf"]
    directives = dict(line.split(None, 1) for line in conf.splitlines() if line and not line.startswith("#"))
    assert directives["appendonly"] == "yes"
    assert directives["appendfsync"] == "everysec"
    assert directives["maxmemory-policy"] == "noeviction", "evicting a stream would drop queued requests"
    redis = one(variant, "StatefulSet", "redis")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["redis-server", "/etc/redis/redis.conf"]
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    (data,) = [m for m in container["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    assert data["mountPath"] == directives["dir"]
    assert quantity_bytes(directives["maxmemory"].replace("gb", "g").replace("mb", "m")) < quantity_bytes(
        container["resources"]["limits"]["memory"]
    )
    url = config(variant)["VQA_REDIS_URL"]
    service = one(variant, "Service", "redis")
    assert url == f"redis://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/0"


# ---- network ---------------------------------------------------------------------------------


def _policies_for(variant: str, component: str) -> list[dict]:
    labels = pod_labels(variant, component)
    return [p["spec"] for p in objects(variant, "NetworkPolicy") if selects(p["spec"]["podSelector"], labels)]


def _peer(peer: dict, variant: str) -> str:
    """A NetworkPolicy peer, named: a component of ours, or namespace[/pod label]."""
    assert "ipBlock" not in peer, "no IP ranges are allowed"
    if "namespaceSelector" not in peer:
        for component in ("gateway", "worker", "redis"):
            if selects(peer["podSelector"], pod_labels(variant, component)):
                return component
        raise AssertionError(f"peer selects none of our pods: {peer}")
    namespace = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
    pod = peer.get("podSelector", {}).get("matchLabels", {})
    return namespace + ("/" + ",".join(f"{k}={v}" for k, v in sorted(pod.items())) if pod else "")


def _allowed(variant: str, component: str, direction: str) -> set[tuple[str, int]]:
    """(peer, port) pairs that the NetworkPolicies selecting ``component`` allow."""
    allowed = set()
    side = "from" if direction == "ingress" else "to"
    for spec in _policies_for(variant, component):
        for rule in spec.get(direction, []):
            assert rule.get(side) and rule.get("ports"), f"{component}: a {direction} rule open to everything"
            allowed |= {(_peer(peer, variant), port["port"]) for peer in rule[side] for port in rule["ports"]}
    return allowed


@pytest.mark.parametrize("variant", VARIANTS)
def test_network_is_default_deny(variant):
    assert [
        p
        for p in objects(variant, "NetworkPolicy")
        if p["spec"]["podSelector"] == {}
        and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ], "no default-deny policy"
    for component in ("gateway", "worker", "redis"):
        for spec in _policies_for(variant, component):
            assert set(spec["policyTypes"]) <= {"Ingress", "Egress"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_only_gateway_and_workers_reach_redis(variant):
    expected = {("gateway", 6379), ("worker", 6379)}
    if variant.startswith("gpu"):  # components/keda: the KEDA operator reads the stream backlog
        expected.add(("keda/app.kubernetes.io/name=keda-operator", 6379))
    assert _allowed(variant, "redis", "ingress") == expected
    assert _allowed(variant, "redis", "egress") == set()


@pytest.mark.parametrize("variant", VARIANTS)
def test_workers_reach_only_redis_and_dns(variant):
    dns = "kube-system/k8s-app=kube-dns"
    assert _allowed(variant, "worker", "ingress") == set()
    assert _allowed(variant, "worker", "egress") == {("redis", 6379), (dns, 53)}
    assert _allowed(variant, "gateway", "egress") == {("redis", 6379), (dns, 53)}


@pytest.mark.parametrize("variant", VARIANTS)
def test_gateway_is_reached_by_the_ingress_controller_and_prometheus(variant):
    assert _allowed(variant, "gateway", "ingress") == {
        ("ingress-nginx/app.kubernetes.io/name=ingress-nginx", 8000),
        ("monitoring", 8000),
    }


# ---- ingress and metrics ---------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_ingress_exposes_only_the_api_within_the_gateway_limits(variant):
    ingress = one(variant, "Ingress", "gateway")
    annotations = ingress["metadata"]["annotations"]
    assert quantity_bytes(annotations["nginx.ingress.kubernetes.io/proxy-body-size"]) > MAX_BODY_BYTES
    assert int(config(variant)["VQA_MAX_BODY_BYTES"]) <= MAX_BODY_BYTES
    timeout_s = int(config(variant)["VQA_MAX_TIMEOUT_MS"]) / 1000
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > timeout_s
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    assert (path["path"], path["pathType"]) == ("/v1", "Prefix")
    service = one(variant, "Service", path["backend"]["service"]["name"])
    assert path["backend"]["service"]["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    assert ("tls" in ingress["spec"]) == (variant != "dev")


@pytest.mark.parametrize("variant", VARIANTS)
def test_gateway_is_scraped_by_prometheus(variant):
    template = one(variant, "Deployment", "gateway")["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    (container,) = template["spec"]["containers"]
    (port,) = container["ports"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == port["containerPort"] == int(config(variant)["VQA_PORT"])
    for monitor in objects(variant, "ServiceMonitor"):
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["path"] == "/metrics"
        assert endpoint["port"] in {p["name"] for p in one(variant, "Service", "gateway")["spec"]["ports"]}


# ---- Dockerfiles -----------------------------------------------------------------------------

DOCKERFILES = {
    "gateway": ("gateway.Dockerfile", "/healthz"),
    "worker": ("worker.Dockerfile", "vqa-worker --check"),
    "edge": ("edge.Dockerfile", None),
}


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(
        r"\\\n", " ", "\n".join(s for s in path.read_text().splitlines() if not s.lstrip().startswith("#"))
    )
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()
    ]


def _final_stage(path: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Every FROM image (ARG defaults substituted, stage names dropped) and the last stage."""
    instructions = _instructions(path)
    args, stages, bases = {}, [], []
    for instruction, value in instructions:
        if instruction == "ARG" and not stages and "=" in value:
            name, default = value.split("=", 1)
            args[name] = default
        if instruction == "FROM":
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], value.split()[0])
            if image not in {s for s in stages}:
                bases.append(image)
            stages.append(value.split()[-1] if " as " in value.lower() else image)
    last = max(i for i, (instruction, _) in enumerate(instructions) if instruction == "FROM")
    return bases, instructions[last:]


@pytest.mark.parametrize("image", DOCKERFILES)
def test_dockerfile_pins_its_base_images(image):
    bases, _ = _final_stage(DOCKER / DOCKERFILES[image][0])
    assert bases
    for base in bases:
        reference, _, digest = base.partition("@")
        tag = reference.rpartition(":")[2] if ":" in reference else ""
        exact_tag = bool(re.match(r"\d+\.\d+\.\d+", tag))
        assert tag != "latest" and (exact_tag or re.fullmatch(r"sha256:[0-9a-f]{64}", digest)), base


@pytest.mark.parametrize("image", DOCKERFILES)
def test_dockerfile_runs_as_non_root_with_a_healthcheck(image):
    name, probe = DOCKERFILES[image]
    _, stage = _final_stage(DOCKER / name)
    users = [value for instruction, value in stage if instruction == "USER"]
    assert users, f"{name}: no USER in the final stage"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, (
        f"{name}: USER must be a numeric non-root uid (runAsNonRoot checks it)"
    )
    (healthcheck,) = [value for instruction, value in stage if instruction == "HEALTHCHECK"]
    if probe is None:
        assert healthcheck == "NONE"  # a one-shot CLI
    else:
        assert healthcheck.split()[0].startswith("--") and probe in healthcheck.replace('", "', " ")
    for workload in ("gateway", "worker"):
        if image == workload:
            pod = one("gpu", "Deployment", workload)["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsUser"] == int(uid)


@pytest.mark.parametrize("image", DOCKERFILES)
def test_dockerfile_context_is_an_allowlist(image):
    ignore = (DOCKER / f"{DOCKERFILES[image][0]}.dockerignore").read_text().splitlines()
    patterns = [line for line in ignore if line and not line.startswith("#")]
    assert patterns[0] == "*", "start by excluding everything"
    included = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert f"deploy/docker/requirements/{image}.txt" in included
    assert ("models" in included) == (image == "worker"), "only the worker image carries the model code"


# Loaded here only because the dev venv has them; the images work without them.
OPTIONAL_IMPORTS = {
    "click": "httpx tries `import click, pygments, rich` for its optional command line",
    "cryptography": "redis.utils tries it (OCSP); mypy's types-pyOpenSSL brings it into the dev venv",
    "sniffio": "anyio tries it; trio (selenium, in the test extra) brings it into the dev venv",
    "pygments": "httpx's optional command line",
    "rich": "httpx's optional command line (the edge image has it anyway: typer needs it)",
    "setuptools": "_distutils_hack, imported by a .pth file of the venv",
}


def _lock(image: str) -> dict[str, str]:
    text = (DOCKER / "requirements" / f"{image}.txt").read_text()
    entries = re.split(
        r"\n(?=[a-z0-9])", "\n".join(s for s in text.splitlines() if not s.startswith("#")).strip()
    )
    pins = {}
    for entry in entries:
        name, version = re.match(r"([a-z0-9][a-z0-9._-]*)==(\S+)", entry).groups()
        assert re.search(r"--hash=sha256:[0-9a-f]{64}", entry), f"{image}.txt: {name} has no hash"
        pins[name] = version
    return pins


def test_lock_files_keep_torch_out_of_gateway_and_edge():
    for image in ("gateway", "edge"):
        assert not {"torch", "transformers", "tokenizers", "triton"} & set(_lock(image))
    assert "torch" not in _lock("worker"), "torch comes from the CUDA index (worker.Dockerfile)"
    assert {"transformers", "fastapi", "redis"} <= set(_lock("worker"))
    assert not {"fastapi", "redis", "uvicorn"} & set(_lock("edge"))


@pytest.mark.parametrize(
    ("image", "entry_point"),
    [("gateway", "import gateway.api.main, uvicorn"), ("edge", "import edge_client.cli")],
)
def test_lock_files_cover_what_the_code_imports(image, entry_point):
    """Every third-party distribution the entry point loads (in this venv) is in the image's lock file."""
    probe = (
        f"{entry_point}; import sys, json, importlib.metadata as md; "
        "dists = md.packages_distributions(); "
        "mods = {m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names); "
        "print(json.dumps(sorted({d for m in mods for d in dists.get(m, [])})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    loaded = {re.sub(r"[-_.]+", "-", d).lower() for d in json.loads(result.stdout)}
    loaded -= {"llava-alignedvq"} | set(OPTIONAL_IMPORTS)
    missing = loaded - set(_lock(image))
    assert not missing, f"{image}.txt lacks {sorted(missing)}"


# ---- deploy/podman ---------------------------------------------------------------------------


def _kube_play():
    import importlib.util

    spec = importlib.util.spec_from_file_location("kube_play", ROOT / "deploy" / "podman" / "kube_play.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_podman_conversion_of_the_dev_overlay():
    """deploy/podman/kube_play.py turns the dev overlay into what podman 4.3 plays, nothing lost."""
    kube_play = _kube_play()
    played = kube_play.convert(
        [json.loads(json.dumps(o)) for o in objects("dev")],
        {"redis": "localhost/vqa-test/redis:7.0-bookworm"},
        {"gateway": 18000},
        {"VQA_ALLOW_ANONYMOUS": "false"},
    )
    assert {o["kind"] for o in played} <= kube_play.PLAYABLE
    by_name = {(o["kind"], o["metadata"]["name"]): o for o in played}
    # Redis: a Pod under the name VQA_REDIS_URL uses, its data on a claim named as Kubernetes would.
    settings = by_name[("ConfigMap", "vqa-config")]["data"]
    host = re.match(r"redis://([^:/]+)", settings["VQA_REDIS_URL"]).group(1)
    redis = by_name[("Pod", host)]["spec"]
    claims = {v.get("persistentVolumeClaim", {}).get("claimName") for v in redis["volumes"]} - {None}
    assert claims == {"data-redis-0"} and ("PersistentVolumeClaim", "data-redis-0") in by_name
    assert redis["containers"][0]["image"] == "localhost/vqa-test/redis:7.0-bookworm"
    assert settings["VQA_ALLOW_ANONYMOUS"] == "false"
    for obj in played:
        pod = obj["spec"] if obj["kind"] == "Pod" else obj.get("spec", {}).get("template", {}).get("spec")
        for container in (pod or {}).get("containers", []):
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert set(container[probe]) & {"httpGet", "tcpSocket"} == set(), container["name"]
            for port in container.get("ports", []):
                published = (container["name"], port["hostPort"], port["hostIP"])
                assert published == ("gateway", 18000, "127.0.0.1")
            # every emptyDir its own volume (podman 4.3 shares same-named ones between pods)
            empty = [v["name"] for v in pod["volumes"] if "emptyDir" in v]
            assert all(name.startswith(obj["metadata"]["name"] + "-") for name in empty)
    # The security context reaches podman unchanged.
    (gateway,) = by_name[("Deployment", "gateway")]["spec"]["template"]["spec"]["containers"]
    (original,) = one("dev", "Deployment", "gateway")["spec"]["template"]["spec"]["containers"]
    assert gateway["securityContext"] == original["securityContext"]
