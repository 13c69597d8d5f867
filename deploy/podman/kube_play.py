"""Rendered manifests (``kubectl kustomize deploy/k8s/overlays/dev``) -> what ``podman kube play`` plays.

    kubectl kustomize deploy/k8s/overlays/dev \\
      | python3 deploy/podman/kube_play.py --image redis=localhost/vqa-test/redis:7.0-bookworm \\
      > /tmp/vqa-dev.yaml
    podman kube play --network vqa /tmp/vqa-dev.yaml

The nearest equivalent of ``kubectl apply -k`` on one machine without a cluster. ``podman kube
play`` (4.3, Debian 12) runs Pods, Deployments, ConfigMaps, PersistentVolumeClaims and emptyDir /
configMap volumes as they are written, including the security contexts (user, read-only root,
capabilities, no-new-privileges, seccomp) and the resource limits. Everything it cannot run is
converted or dropped here, and each change is reported on stderr:

- a StatefulSet becomes a Pod named after the Service that selects it (``redis``: the name
  VQA_REDIS_URL uses, resolved by podman's network DNS) and each ``volumeClaimTemplate`` a
  PersistentVolumeClaim named as Kubernetes would (``data-redis-0``), i.e. a podman volume;
- ``httpGet`` and ``tcpSocket`` probes become ``exec`` probes doing the same check with the image's
  Python (podman turns ``httpGet`` into a ``curl`` call, and our images have no curl);
- the container port named ``http`` of the gateway gets ``hostPort`` 18000 on 127.0.0.1 (what
  ``kubectl port-forward svc/gateway 18000:80`` gives); other container ports are removed, as
  podman would publish them on the host (in Kubernetes they only document the port);
- emptyDir volumes get the workload's name as a prefix (podman 4.3 makes a named volume of each,
  shared by all pods that call theirs alike);
- ``--config KEY=VALUE`` sets a key of the ConfigMap vqa-config (deploy/podman/run.sh turns
  the dev overlay's anonymous access off, so that the run needs an API key as production does);
- ``--image NAME=REF`` replaces images (Redis is pinned by a digest that a local build cannot have);
- Services, the Ingress, autoscalers, PodDisruptionBudgets, NetworkPolicies and the Namespace are
  dropped: podman has no equivalent (one pod per Deployment, no policy enforcement, no namespace).

Standard library + PyYAML only.
"""

from __future__ import annotations

import argparse
import copy
import sys

import yaml

DROPPED = {
    "Namespace": "podman has no namespaces",
    "Service": "pods reach each other by pod name on the podman network",
    "Ingress": "no ingress controller; the gateway's port is published on 127.0.0.1 instead",
    "HorizontalPodAutoscaler": "no autoscaling: one pod per Deployment",
    "PodDisruptionBudget": "no evictions on one machine",
    "NetworkPolicy": "podman does not enforce NetworkPolicies",
    "ScaledObject": "no KEDA",
    "ServiceMonitor": "no Prometheus Operator",
}
PLAYABLE = {"ConfigMap", "Deployment", "Pod", "PersistentVolumeClaim"}
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
CONFIG_MAP = "vqa-config"


def _note(message: str) -> None:
    print(f"kube_play: {message}", file=sys.stderr)


def _port_number(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    for entry in container.get("ports", []):
        if entry.get("name") == port:
            return int(entry["containerPort"])
    raise ValueError(f"container {container['name']}: no port named {port!r}")


def _exec_probe(container: dict, probe: dict) -> dict:
    """``httpGet`` / ``tcpSocket`` -> the same check as an ``exec`` of the image's Python."""
    probe = dict(probe)
    if "httpGet" in probe:
        get = probe.pop("httpGet")
        url = f"http://127.0.0.1:{_port_number(container, get['port'])}{get.get('path', '/')}"
        code = (
            f"import sys, urllib.request; sys.exit(urllib.request.urlopen({url!r}, timeout=2).status >= 400)"
        )
    elif "tcpSocket" in probe:
        port = _port_number(container, probe.pop("tcpSocket")["port"])
        code = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2).close()"
    else:
        return probe
    probe["exec"] = {"command": ["python3", "-c", code]}
    return probe


def _images(pod: dict, images: dict[str, str]) -> None:
    for container in pod.get("initContainers", []) + pod["containers"]:
        reference = container["image"].partition("@")[0]
        repository = reference.rpartition(":")[0] if ":" in reference.rpartition("/")[2] else reference
        if repository in images:
            _note(f"image {container['image']} -> {images[repository]}")
            container["image"] = images[repository]


def _own_empty_dirs(pod: dict, owner: str) -> None:
    """podman 4.3 backs an emptyDir with a named volume called as the pod's volume, shared by every
    pod that names one alike (all our pods have ``tmp``): prefix the owner, so each gets its own."""
    renamed = {}
    for volume in pod.get("volumes", []):
        if "emptyDir" in volume:
            renamed[volume["name"]] = volume["name"] = f"{owner}-{volume['name']}"
    for container in pod.get("initContainers", []) + pod["containers"]:
        for mount in container.get("volumeMounts", []):
            mount["name"] = renamed.get(mount["name"], mount["name"])


def _probes_and_ports(pod: dict, publish: dict[str, int]) -> None:
    for container in pod["containers"]:
        for name in PROBES:
            if name in container:
                converted = _exec_probe(container, container[name])
                if converted != container[name]:
                    _note(f"{container['name']}: {name} -> exec (same check, no curl needed)")
                container[name] = converted
        for port in container.get("ports", []):
            if port.get("name") == "http" and container["name"] in publish:
                port.update(hostPort=publish[container["name"]], hostIP="127.0.0.1")
                where = f"127.0.0.1:{port['hostPort']}"
                _note(f"{container['name']}: port {port['containerPort']} published on {where}")
        # podman publishes a Pod's containerPorts on the host as they are; in Kubernetes they only
        # document the port, which the pod network reaches anyway. Keep only the published ones.
        if "ports" in container:
            container["ports"] = [p for p in container["ports"] if "hostPort" in p]
            if not container["ports"]:
                del container["ports"]


def _statefulset_to_pod(sts: dict, services: list[dict]) -> list[dict]:
    """A one-replica StatefulSet -> its PVCs + a Pod named after the Service that selects it."""
    labels = sts["spec"]["template"]["metadata"].get("labels", {})
    names = [
        s["metadata"]["name"]
        for s in services
        if s["spec"].get("clusterIP") != "None"
        and s["spec"].get("selector")
        and all(labels.get(k) == v for k, v in s["spec"]["selector"].items())
    ]
    name = names[0] if names else sts["metadata"]["name"]
    pod_spec = copy.deepcopy(sts["spec"]["template"]["spec"])
    out = []
    for template in sts["spec"].get("volumeClaimTemplates", []):
        claim = f"{template['metadata']['name']}-{sts['metadata']['name']}-0"
        out.append(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": claim, "labels": template["metadata"].get("labels", {})},
                "spec": template["spec"],
            }
        )
        pod_spec.setdefault("volumes", []).append(
            {"name": template["metadata"]["name"], "persistentVolumeClaim": {"claimName": claim}}
        )
    pod_spec.setdefault("restartPolicy", "Always")
    out.append(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "labels": labels,
                "annotations": sts["spec"]["template"]["metadata"].get("annotations", {}),
            },
            "spec": pod_spec,
        }
    )
    claims = [o["metadata"]["name"] for o in out[:-1]]
    _note(f"StatefulSet {sts['metadata']['name']} -> Pod {name} + PVCs {claims}")
    return out


def convert(
    docs: list[dict], images: dict[str, str], publish: dict[str, int], config: dict[str, str] | None = None
) -> list[dict]:
    services = [d for d in docs if d["kind"] == "Service"]
    out: list[dict] = []
    for doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind == "ConfigMap" and name == CONFIG_MAP and config:
            doc = copy.deepcopy(doc)
            for key, value in config.items():
                _note(f"ConfigMap {name}: {key}={value} (was {doc['data'].get(key)})")
                doc["data"][key] = value
        if kind in DROPPED:
            _note(f"dropped {kind} {name}: {DROPPED[kind]}")
            continue
        if kind == "StatefulSet":
            out.extend(_statefulset_to_pod(doc, services))
        elif kind in PLAYABLE:
            out.append(copy.deepcopy(doc))
        else:
            raise SystemExit(
                f"kube_play: {kind} {name}: no podman equivalent known; extend DROPPED or PLAYABLE"
            )
    for doc in out:
        doc["metadata"].pop("namespace", None)
        pod = {"Pod": doc.get("spec"), "Deployment": doc.get("spec", {}).get("template", {}).get("spec")}
        pod = pod.get(doc["kind"])
        if pod is not None:
            _own_empty_dirs(pod, doc["metadata"]["name"])
            _images(pod, images)
            _probes_and_ports(pod, publish)
    # ConfigMaps and PVCs first: podman resolves envFrom and volumes while it creates each pod.
    order = {"ConfigMap": 0, "PersistentVolumeClaim": 1}
    return sorted(out, key=lambda d: order.get(d["kind"], 2))


def _pairs(values: list[str], what: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        key, sep, target = value.partition("=")
        if not sep or not key or not target:
            raise SystemExit(f"kube_play: expected {what}, got {value!r}")
        pairs[key] = target
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", action="append", default=[], metavar="NAME=REF", help="replace an image")
    parser.add_argument(
        "--publish",
        action="append",
        default=["gateway=18000"],
        metavar="CONTAINER=PORT",
        help="publish the container's 'http' port on 127.0.0.1:PORT (default gateway=18000)",
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"set a key of ConfigMap {CONFIG_MAP}",
    )
    args = parser.parse_args(argv)
    docs = [d for d in yaml.safe_load_all(sys.stdin) if d]
    publish = {k: int(v) for k, v in _pairs(args.publish, "CONTAINER=PORT").items()}
    played = convert(docs, _pairs(args.image, "NAME=REF"), publish, _pairs(args.config, "KEY=VALUE"))
    yaml.safe_dump_all(played, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
