"""A kustomize subset in pure Python: exactly the features ``deploy/k8s`` uses, nothing more.

No kustomize is installable from PyPI for Python 3.11 (``kustomize`` on PyPI is an unrelated
manifest DSL; ``pykustomize`` needs Python >= 3.14), so the manifest tests render the overlays with
this module. Supported, with kustomize's semantics:

- ``resources``: YAML files (one or more documents) and directories holding a kustomization;
- ``components``: directories holding a ``kind: Component`` kustomization, applied after the
  resources (their resources are added, then their patches and transformers run);
- ``namespace``: set on every namespaced object (a ``Namespace`` object keeps its name);
- ``patches`` given as ``path:`` or inline ``patch:`` holding strategic-merge patches, matched by
  kind and name (``target:`` is not supported). Maps merge, ``null`` deletes a key, lists of the
  built-in kinds merge on their patch-merge keys (containers by ``name``, volumeMounts by
  ``mountPath`` ...; the merged list is the patch's items in patch order, then the other original
  items), every other list is replaced, as kustomize does for custom resources;
- ``images`` (``name`` / ``newName`` / ``newTag`` / ``digest``) on containers and initContainers;
- ``replicas`` (``name`` / ``count``) on Deployments and StatefulSets.

Anything else in a kustomization (generators, namePrefix, labels, JSON 6902 patches, ``$patch``
directives ...) raises :class:`Unsupported` instead of being silently ignored. Where ``kubectl``
is installed, ``tests/deploy/test_manifests.py`` checks that this renderer and ``kubectl kustomize``
produce the same objects for every overlay.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Unsupported", "object_id", "render"]

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
_SUPPORTED_FIELDS = {
    "apiVersion",
    "kind",
    "namespace",
    "resources",
    "components",
    "patches",
    "images",
    "replicas",
}
# Kinds that are not namespaced (of those the manifests could plausibly contain).
_CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "PriorityClass",
    "StorageClass",
    "IngressClass",
}
# Patch-merge keys of the lists the built-in kinds merge (k8s.io/api struct tags), by field name.
# Lists without a key (tolerations, envFrom, args, rules, triggers ...) are replaced.
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}
_PORT_KEYS = {"Service": "port"}  # container ports merge on containerPort, Service ports on port
_BUILTIN_GROUPS = {"v1", "apps/v1", "batch/v1", "policy/v1", "autoscaling/v2", "networking.k8s.io/v1"}


class Unsupported(ValueError):
    """The kustomization uses a feature this subset does not implement."""


def object_id(obj: dict) -> tuple[str, str, str, str]:
    """``(apiVersion, kind, namespace, name)``: how objects are told apart."""
    meta = obj.get("metadata", {})
    return obj["apiVersion"], obj["kind"], meta.get("namespace", ""), meta["name"]


def render(directory: str | Path) -> list[dict]:
    """The objects ``kustomize build directory`` would print (order aside)."""
    return _build(Path(directory), expect_component=False)


def _load_kustomization(directory: Path) -> dict:
    for name in KUSTOMIZATION_FILES:
        path = directory / name
        if path.is_file():
            data = yaml.safe_load(path.read_text()) or {}
            unknown = set(data) - _SUPPORTED_FIELDS
            if unknown:
                raise Unsupported(f"{path}: fields {sorted(unknown)} are outside the supported subset")
            return data
    raise FileNotFoundError(f"no kustomization in {directory}")


def _load_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _build(directory: Path, *, expect_component: bool) -> list[dict]:
    kustomization = _load_kustomization(directory)
    is_component = kustomization.get("kind") == "Component"
    if is_component != expect_component:
        raise Unsupported(f"{directory}: expected a {'Component' if expect_component else 'Kustomization'}")
    objects: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        objects.extend(_build(path, expect_component=False) if path.is_dir() else _load_documents(path))
    for entry in kustomization.get("components", []):
        objects = _apply_component(objects, directory / entry)
    _transform(objects, kustomization, directory)
    return objects


def _apply_component(objects: list[dict], directory: Path) -> list[dict]:
    kustomization = _load_kustomization(directory)
    if kustomization.get("kind") != "Component":
        raise Unsupported(f"{directory}: components must be kind Component")
    objects = objects + [
        obj
        for entry in kustomization.get("resources", [])
        for obj in (
            _build(directory / entry, expect_component=False)
            if (directory / entry).is_dir()
            else _load_documents(directory / entry)
        )
    ]
    for entry in kustomization.get("components", []):
        objects = _apply_component(objects, directory / entry)
    _transform(objects, kustomization, directory)
    return objects


def _transform(objects: list[dict], kustomization: dict, directory: Path) -> None:
    for patch in kustomization.get("patches", []):
        if set(patch) - {"path", "patch"}:
            raise Unsupported(f"{directory}: only `path:` or `patch:` strategic-merge patches, got {patch}")
        text = (directory / patch["path"]).read_text() if "path" in patch else patch["patch"]
        for document in yaml.safe_load_all(text):
            if document:
                _apply_patch(objects, document)
    namespace = kustomization.get("namespace")
    if namespace:
        for obj in objects:
            if obj["kind"] not in _CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = namespace
    for replica in kustomization.get("replicas", []):
        _set_replicas(objects, replica["name"], replica["count"])
    for image in kustomization.get("images", []):
        _set_image(objects, image)


def _apply_patch(objects: list[dict], patch: dict) -> None:
    if not isinstance(patch, dict) or "kind" not in patch or "name" not in patch.get("metadata", {}):
        raise Unsupported(f"not a strategic-merge patch (JSON 6902 patches are unsupported): {patch!r}")
    matches = [
        obj
        for obj in objects
        if obj["kind"] == patch["kind"]
        and obj["metadata"]["name"] == patch["metadata"]["name"]
        and patch["metadata"].get("namespace", obj["metadata"].get("namespace"))
        == obj["metadata"].get("namespace")
    ]
    if len(matches) != 1:
        raise ValueError(
            f"patch for {patch['kind']}/{patch['metadata']['name']} matches {len(matches)} objects"
        )
    target = matches[0]
    builtin = target["apiVersion"] in _BUILTIN_GROUPS
    merged = _merge(target, copy.deepcopy(patch), builtin=builtin, kind=target["kind"])
    target.clear()
    target.update(merged)


def _merge(original: Any, patch: Any, *, builtin: bool, kind: str, field: str = "") -> Any:
    if isinstance(patch, dict) and "$patch" in patch:
        raise Unsupported(f"$patch directives are unsupported (in {field or 'the patch root'})")
    if isinstance(original, dict) and isinstance(patch, dict):
        result = dict(original)
        for key, value in patch.items():
            if key.startswith("$"):
                raise Unsupported(f"directive {key} is unsupported")
            if value is None:
                result.pop(key, None)
            elif key in result:
                result[key] = _merge(result[key], value, builtin=builtin, kind=kind, field=key)
            else:
                result[key] = _strip_nulls(value)
        return result
    if isinstance(original, list) and isinstance(patch, list) and builtin:
        key = _merge_key(field, kind, patch)
        if key is not None:
            return _merge_list(original, patch, key, kind)
    return _strip_nulls(patch)


def _merge_key(field: str, kind: str, items: list) -> str | None:
    if field == "ports":
        return _PORT_KEYS.get(kind, "containerPort")
    if field in _MERGE_KEYS:
        return _MERGE_KEYS[field]
    return None


def _merge_list(original: list, patch: list, key: str, kind: str) -> list:
    by_key = {item[key]: item for item in original}
    result = []
    for item in patch:
        if item[key] in by_key:
            result.append(_merge(by_key[item[key]], item, builtin=True, kind=kind))
        else:
            result.append(_strip_nulls(item))
    patched = {item[key] for item in patch}
    result.extend(item for item in original if item[key] not in patched)
    return result


def _strip_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_nulls(v) for v in value]
    return value


def _pod_specs(obj: dict) -> list[dict]:
    spec = obj.get("spec", {})
    if obj["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
        return [spec.get("template", {}).get("spec", {})]
    if obj["kind"] == "CronJob":
        return [spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec", {})]
    if obj["kind"] == "Pod":
        return [spec]
    return []


def _set_replicas(objects: list[dict], name: str, count: int) -> None:
    matches = [
        o for o in objects if o["kind"] in {"Deployment", "StatefulSet"} and o["metadata"]["name"] == name
    ]
    if not matches:
        raise ValueError(f"replicas: no Deployment or StatefulSet named {name!r}")
    for obj in matches:
        obj["spec"]["replicas"] = count


def _split_image(image: str) -> tuple[str, str, str]:
    """``name[:tag][@digest]`` -> (name, tag, digest); a registry port is not a tag."""
    name, _, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = ""
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, digest


def _set_image(objects: list[dict], rule: dict) -> None:
    if set(rule) - {"name", "newName", "newTag", "digest"}:
        raise Unsupported(f"images entry {rule} has unsupported fields")
    for obj in objects:
        for pod in _pod_specs(obj):
            for container in pod.get("containers", []) + pod.get("initContainers", []):
                name, tag, digest = _split_image(container["image"])
                if name != rule["name"]:
                    continue
                name = rule.get("newName", name)
                if "digest" in rule:
                    container["image"] = f"{name}@{rule['digest']}"
                    continue
                if "newTag" in rule:  # as kustomize: a new tag replaces the tag and drops a digest
                    tag, digest = str(rule["newTag"]), ""
                container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
