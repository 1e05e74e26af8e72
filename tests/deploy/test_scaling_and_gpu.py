"""The KEDA autoscaler example and the GPU deployment: the ScaledObject scales the node Deployment on a metric the
nodes export, KEDA's schema rejects what KEDA would; the GPU nodes' TensorRT-EP engine cache lands on a
writable volume (by the engines' own path rule), the GPU export Job builds plans where the nodes run, and
Dockerfile.cuda carries one CUDA user-space stack."""

from __future__ import annotations

import copy
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from engines import manifest as mf
from engines.backends import ort as ort_backend
from tests.deploy import keda, kustomize
from tests.deploy.test_deploy import DEPLOY, KUBERNETES_VERSION, dockerfile_stages
from tests.processes import ROOT

Rendered = dict[str, list[dict[str, Any]]]


def scaled_object(rendered: Rendered) -> dict[str, Any]:
    return kustomize.find(rendered["examples"], "ScaledObject", "sdserve-node")


def test_scaled_object_scales_the_nodes_on_their_queue(rendered: Rendered) -> None:
    spec = scaled_object(rendered)["spec"]
    node = kustomize.find(rendered["base"], "Deployment", "sdserve-node")
    target = spec["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (node["apiVersion"], node["kind"], "sdserve-node")
    budget = kustomize.find(rendered["base"], "PodDisruptionBudget", "sdserve-node")
    assert spec["minReplicaCount"] > budget["spec"]["minAvailable"]  # a drain can still evict one
    # Prometheus' labelmap of the pod labels (invalid characters → "_"): every matcher selects the node pods
    labels = {re.sub(r"[^A-Za-z0-9_]", "_", k): v for k, v in node["spec"]["template"]["metadata"]["labels"].items()}
    for trigger in spec["triggers"]:
        matchers = re.findall(r'(\w+)\s*=\s*"([^"]*)"', trigger["metadata"]["query"])
        assert matchers and all(labels.get(name) == value for name, value in matchers), matchers


@pytest.mark.parametrize("break_it", [
    lambda d: d["spec"].update(minReplicas=d["spec"].pop("minReplicaCount")),  # the HPA's spelling
    lambda d: d["spec"]["triggers"][0]["metadata"].update(threshold=2),  # KEDA's metadata is strings
    lambda d: d["spec"]["triggers"][0]["metadata"].pop("serverAddress"),
    lambda d: d["spec"]["triggers"][0]["metadata"].update(serverAdress="http://prometheus:9090"),
    lambda d: d["spec"]["triggers"][0].update(metricType="Average"),
    lambda d: d["spec"].update(minReplicaCount=9, maxReplicaCount=8),
], ids=["hpa-field", "number-threshold", "no-server", "misspelt-key", "metric-type", "min-above-max"])
def test_keda_validation_is_real(rendered: Rendered, break_it: Callable[[dict[str, Any]], None]) -> None:
    broken = copy.deepcopy(scaled_object(rendered))
    break_it(broken)
    with pytest.raises(jsonschema.ValidationError):
        keda.validate(broken, KUBERNETES_VERSION)


def test_keda_kubernetes_parts_go_through_kubernetes_validate(rendered: Rendered) -> None:
    broken = copy.deepcopy(scaled_object(rendered))
    behavior = broken["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    behavior["scaleDown"]["stabilizationWindow"] = behavior["scaleDown"].pop("stabilizationWindowSeconds")
    with pytest.raises(kubernetes_validate.ValidationError):
        keda.validate(broken, KUBERNETES_VERSION)
    broken = copy.deepcopy(scaled_object(rendered))
    broken["metadata"]["label"] = broken["metadata"].pop("labels")
    with pytest.raises(kubernetes_validate.ValidationError):
        keda.validate(broken, KUBERNETES_VERSION)


def mount_for(container: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume mount a path lies on (the deepest one)."""
    mounts = [m for m in container.get("volumeMounts", []) if Path(path).is_relative_to(m["mountPath"])]
    assert mounts, f"{path} is on the container's root filesystem"
    return max(mounts, key=lambda m: len(m["mountPath"]))


def test_gpu_nodes_cache_tensorrt_engines_on_a_writable_volume(rendered: Rendered, tiny_model: Callable[[str], Path],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    spec = kustomize.pod_spec(kustomize.find(rendered["gpu"], "Deployment", "sdserve-node"))
    container = spec["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SDSERVE_BACKEND"] in ("auto", "tensorrt-ep")  # both may use the EP's cache
    monkeypatch.setenv("SDSERVE_CACHE_DIR", env["SDSERVE_CACHE_DIR"])  # KeyError before the overlay set it
    root = tiny_model("tiny-sd15")
    manifest = mf.read(root)
    backend = ort_backend.OrtBackend(root, "tensorrt-ep", manifest)
    for key, component in manifest.components.items():
        options = backend.tensorrt_options(key, component)
        for option in ("trt_engine_cache_path", "trt_timing_cache_path"):
            mount = mount_for(container, str(options[option]))
            volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
            assert not mount.get("readOnly") and "emptyDir" in volume, (option, mount, volume)


def test_gpu_export_job_builds_plans_where_the_nodes_run(rendered: Rendered) -> None:
    node = kustomize.pod_spec(kustomize.find(rendered["gpu"], "Deployment", "sdserve-node"))
    jobs = [d for d in rendered["gpu-jobs"] if d["kind"] == "Job"]
    assert jobs
    for job in jobs:
        spec = kustomize.pod_spec(job)
        container = spec["containers"][0]
        assert "--tensorrt" in container["args"]
        # plans are valid only for the GPU and TensorRT that built them: the nodes' machines and image tag
        assert spec["nodeSelector"] == node["nodeSelector"] and spec["tolerations"] == node["tolerations"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["image"].split(":")[1] == node["containers"][0]["image"].split(":")[1] == "cuda"
        output = container["args"][container["args"].index("--output") + 1]
        mount = mount_for(container, output)
        assert not mount.get("readOnly")
        claim = next(v for v in spec["volumes"] if v["name"] == mount["name"])["persistentVolumeClaim"]["claimName"]
        node_models = next(v for v in node["volumes"] if v["name"] == "models")
        assert claim == node_models["persistentVolumeClaim"]["claimName"]


def test_dockerfile_cuda_has_one_cuda_stack() -> None:
    """CUDA, cuDNN and TensorRT come from the wheels pyproject.toml pins, on the CPU image's Python base (no
    CUDA image beneath them), and PyTorch in the export stage is the CPU build (no CUDA of its own)."""
    cuda, cpu = (DEPLOY / "Dockerfile.cuda").read_text(), (DEPLOY / "Dockerfile").read_text()
    base = re.compile(r"^ARG PYTHON_IMAGE=(\S+)$", re.M)
    assert base.search(cuda) and base.search(cuda).group(1) == base.search(cpu).group(1)
    froms = re.findall(r"^FROM (\S+)", cuda, re.M)
    assert all(image == "${PYTHON_IMAGE}" or image in dockerfile_stages(DEPLOY / "Dockerfile.cuda") for image in froms)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(re.match(r"onnxruntime-gpu\[cuda,cudnn\]", d) for d in extras["gpu"])
    installs = re.findall(r"pip install [^\n]*", cuda)
    assert re.search(r"^ARG TENSORRT_EXTRA=tensorrt$", cuda, re.M)  # or tensorrt-ep: a TensorRT wheel either way
    assert any(".[gpu,${TENSORRT_EXTRA}]" in i for i in installs)
    exports = [i for i in installs if "export]" in i]
    assert exports and all('--extra-index-url "${TORCH_INDEX}"' in i for i in exports)
    assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cpu$", cuda, re.M)
    assert re.search(r"NVIDIA_DRIVER_CAPABILITIES=\S*compute", cuda)
