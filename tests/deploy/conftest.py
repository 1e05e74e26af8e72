"""The Kubernetes files as `kubectl apply` would send them: each kustomization rendered, and the files
applied with `kubectl apply -f` (examples/, the GPU overlay's Jobs) as they are."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy import kustomize
from tests.processes import ROOT

KUBE = ROOT / "deploy" / "kubernetes"


def documents(paths: list[Path]) -> list[dict[str, Any]]:
    return [d for path in sorted(paths) for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {"base": kustomize.render(KUBE / "base"), "gpu": kustomize.render(KUBE / "overlays" / "gpu"),
            "examples": documents(list((KUBE / "examples").glob("*.yaml"))),
            "gpu-jobs": documents(list((KUBE / "overlays" / "gpu").glob("*-job.yaml")))}
