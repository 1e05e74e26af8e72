"""Rendering deploy/kubernetes kustomizations without the kubectl or kustomize binaries (neither
installs from the registries the tests may use): the subset of kustomize the files use, and an error
for anything else, so that a new kustomize feature in the files cannot be silently skipped here.

    resources  files (several YAML documents each) and folders holding a kustomization.yaml
    patches    strategic-merge patches from `path`, on `target` kind and name (or the patch's own)
    images     `name` → `newName`/`newTag` on every container and init container
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "patches", "images"}


def render(folder: Path) -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(kustomization) - SUPPORTED
    if unknown:
        raise ValueError(f"{folder}: kustomization fields this loader does not apply: {sorted(unknown)}")
    documents: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = folder / resource
        documents += render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in kustomization.get("patches", []):
        body = yaml.safe_load((folder / patch["path"]).read_text())
        target = patch.get("target") or {"kind": body["kind"], "name": body["metadata"]["name"]}
        matches = [d for d in documents if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]]
        if not matches:
            raise ValueError(f"{folder}: patch {patch['path']} matches no resource")
        for document in matches:
            merge(document, body)
    for image in kustomization.get("images", []):
        for container in containers(documents):
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag or 'latest')}"
    return documents


def merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """Strategic merge as kustomize does it for the fields used here: maps merge, lists of named items
    (containers, env, ports, volumes) merge by name, other lists are replaced."""
    for key, value in patch.items():
        current = target.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            merge(current, value)
        elif isinstance(value, list) and isinstance(current, list) and all(
                isinstance(item, dict) and "name" in item for item in [*value, *current]):
            by_name = {item["name"]: item for item in current}
            for item in value:
                if item["name"] in by_name:
                    merge(by_name[item["name"]], item)
                else:
                    current.append(copy.deepcopy(item))
        else:
            target[key] = copy.deepcopy(value)


def pod_spec(document: dict[str, Any]) -> dict[str, Any] | None:
    spec = document.get("spec", {})
    if document["kind"] in ("Deployment", "StatefulSet", "Job"):
        return spec["template"]["spec"]
    return None


def containers(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for document in documents:
        spec = pod_spec(document)
        if spec is not None:
            found += spec.get("containers", []) + spec.get("initContainers", [])
    return found


def find(documents: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in documents if d["kind"] == kind and d["metadata"]["name"] == name)
