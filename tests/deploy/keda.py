"""KEDA's ScaledObject, validated offline: kubernetes-validate knows only Kubernetes' own kinds, and KEDA's
CRD is not a package the tests can install. A JSON schema of the fields the deploy files use, written from
KEDA's documentation (keda.sh/docs/latest/reference/scaledobject-spec and .../scalers/prometheus), strict
as `kubectl apply --validate=strict` is (an unknown or misspelt field is an error); the parts that are
Kubernetes types (ObjectMeta, the HPA behavior) go through kubernetes-validate inside a kind it knows."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import kubernetes_validate

API_VERSION = "keda.sh/v1alpha1"
INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
NUMBER_TEXT = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"}  # thresholds are strings holding a float


def _object(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


PROMETHEUS_METADATA = _object({
    "serverAddress": {"type": "string", "pattern": "^https?://"},
    "query": {"type": "string", "minLength": 1},
    "threshold": NUMBER_TEXT,
    "activationThreshold": NUMBER_TEXT,
    "namespace": {"type": "string"},
    "customHeaders": {"type": "string"},
    "ignoreNullValues": {"enum": ["true", "false"]},
    "queryParameters": {"type": "string"},
    "unsafeSsl": {"enum": ["true", "false"]},
    "timeout": {"type": "string", "pattern": "^[0-9]+$"},
}, ("serverAddress", "query", "threshold"))

TRIGGER = _object({
    "type": {"const": "prometheus"},  # the only scaler used here; another needs its metadata schema first
    "name": {"type": "string"},
    "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
    "useCachedMetrics": {"type": "boolean"},
    "authenticationRef": _object({"name": {"type": "string"}, "kind": {"type": "string"}}, ("name",)),
    "metadata": PROMETHEUS_METADATA,
}, ("type", "metadata"))

SCALED_OBJECT = _object({
    "apiVersion": {"const": API_VERSION},
    "kind": {"const": "ScaledObject"},
    "metadata": {"type": "object"},  # ObjectMeta: checked by kubernetes-validate (below)
    "spec": _object({
        "scaleTargetRef": _object({"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                   "name": {"type": "string", "minLength": 1},
                                   "envSourceContainerName": {"type": "string"}}, ("name",)),
        "pollingInterval": INT32,
        "cooldownPeriod": INT32,
        "initialCooldownPeriod": INT32,
        "idleReplicaCount": INT32,
        "minReplicaCount": INT32,
        "maxReplicaCount": INT32,
        "fallback": _object({"failureThreshold": INT32, "replicas": INT32}, ("failureThreshold", "replicas")),
        "advanced": _object({
            "restoreToOriginalReplicaCount": {"type": "boolean"},
            "horizontalPodAutoscalerConfig": _object({
                "name": {"type": "string"},
                "behavior": {"type": "object"},  # autoscaling/v2 HorizontalPodAutoscalerBehavior (below)
            }),
        }),
        "triggers": {"type": "array", "minItems": 1, "items": TRIGGER},
    }, ("scaleTargetRef", "triggers")),
}, ("apiVersion", "kind", "metadata", "spec"))


def validate(document: dict[str, Any], kubernetes_version: str) -> None:
    """Raises jsonschema.ValidationError or kubernetes_validate.ValidationError."""
    jsonschema.Draft202012Validator(SCALED_OBJECT).validate(document)
    spec = document["spec"]
    if spec.get("minReplicaCount", 0) > spec.get("maxReplicaCount", 100):  # KEDA's defaults
        raise jsonschema.ValidationError("minReplicaCount is above maxReplicaCount")
    holder = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": copy.deepcopy(document["metadata"])}
    kubernetes_validate.validate(holder, kubernetes_version, strict=True)
    behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
    if behavior is not None:
        hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "behavior"},
               "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "behavior"}, "maxReplicas": 1,
                        "behavior": behavior}}
        kubernetes_validate.validate(hpa, kubernetes_version, strict=True)
