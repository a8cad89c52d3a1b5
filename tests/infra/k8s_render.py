"""Render infra/k8s as `kubectl apply -k` would, without kustomize: the resources of
kustomization.yaml in order, its namespace set on namespaced objects, its image names
replaced. Only the kustomization features the manifests use are supported (anything else
fails loudly), so the render cannot silently differ from kustomize's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

K8S = Path(__file__).resolve().parents[2] / "infra" / "k8s"
SUPPORTED = {"apiVersion", "kind", "namespace", "resources", "images"}
CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
    "PersistentVolume", "StorageClass", "PriorityClass", "IngressClass",
}  # fmt: skip


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _images(obj: Any, table: dict[str, str]) -> None:
    """Replace `image: NAME` (NAME without tag) in every container list, recursively."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "image" and isinstance(v, str) and v in table:
                obj[k] = table[v]
            else:
                _images(v, table)
    elif isinstance(obj, list):
        for v in obj:
            _images(v, table)


def render(extra: list[Path] | None = None, directory: Path = K8S) -> list[dict[str, Any]]:
    """Every object of the kustomization (plus `extra` files, given the same treatment)."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kust) - SUPPORTED
    if unknown:
        raise ValueError(f"kustomization.yaml uses {sorted(unknown)}: teach k8s_render.py")
    table = {
        i["name"]: f"{i.get('newName', i['name'])}:{i['newTag']}" for i in kust.get("images", [])
    }
    docs: list[dict[str, Any]] = []
    for f in [*(directory / r for r in kust["resources"]), *(extra or [])]:
        for d in load_docs(f):
            if d["kind"] not in CLUSTER_SCOPED and "namespace" in kust:
                d.setdefault("metadata", {})["namespace"] = kust["namespace"]
            _images(d, table)
            docs.append(d)
    return docs
