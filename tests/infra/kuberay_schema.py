"""JSON schema of the KubeRay RayCluster fields the manifests use (apiVersion ray.io/v1),
written from KubeRay's API reference (docs/reference/api.md: RayClusterSpec, AuthOptions,
AutoscalerOptions, HeadGroupSpec, WorkerGroupSpec; KubeRay 1.6+, where authOptions
appeared). Objects list the documented fields and refuse others, so a misspelt field fails.
Embedded Kubernetes types (pod templates, resources, security contexts) are not repeated
here: the tests validate them with kubernetes-validate against the Kubernetes schemas."""

from __future__ import annotations

from typing import Any

INT32: dict[str, Any] = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
STRING_MAP: dict[str, Any] = {"type": "object", "additionalProperties": {"type": "string"}}
K8S_OBJECT: dict[str, Any] = {"type": "object"}  # checked by kubernetes-validate
K8S_LIST: dict[str, Any] = {"type": "array", "items": {"type": "object"}}

AUTH_OPTIONS = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "mode": {"enum": ["disabled", "token"]},
        "secretName": {"type": "string"},
        "enableK8sTokenAuth": {"type": "boolean"},
    },
}

AUTOSCALER_OPTIONS = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "resources": K8S_OBJECT,
        "image": {"type": "string"},
        "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
        "securityContext": K8S_OBJECT,
        "idleTimeoutSeconds": INT32,
        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
        "version": {"enum": ["v1", "v2"]},
        "env": K8S_LIST,
        "envFrom": K8S_LIST,
        "volumeMounts": K8S_LIST,
        "command": {"type": "array", "items": {"type": "string"}},
        "args": {"type": "array", "items": {"type": "string"}},
    },
}

HEAD_GROUP = {
    "type": "object",
    "additionalProperties": False,
    "required": ["template"],
    "properties": {
        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
        "headService": K8S_OBJECT,
        "enableIngress": {"type": "boolean"},
        "rayStartParams": STRING_MAP,
        "template": K8S_OBJECT,
        "labels": STRING_MAP,
        "resources": STRING_MAP,
    },
}

WORKER_GROUP = {
    "type": "object",
    "additionalProperties": False,
    "required": ["groupName", "maxReplicas", "minReplicas", "template"],
    "properties": {
        "groupName": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "replicas": {**INT32, "minimum": 0},
        "minReplicas": {**INT32, "minimum": 0},
        "maxReplicas": {**INT32, "minimum": 0},
        "idleTimeoutSeconds": INT32,
        "numOfHosts": {**INT32, "minimum": 1},
        "suspend": {"type": "boolean"},
        "rayStartParams": STRING_MAP,
        "template": K8S_OBJECT,
        "scaleStrategy": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"workersToDelete": {"type": "array", "items": {"type": "string"}}},
        },
        "labels": STRING_MAP,
        "resources": STRING_MAP,
    },
}

RAYCLUSTER = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayCluster"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": STRING_MAP,
                "annotations": STRING_MAP,
            },
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["headGroupSpec"],
            "properties": {
                "rayVersion": {"type": "string"},
                "enableInTreeAutoscaling": {"type": "boolean"},
                "authOptions": AUTH_OPTIONS,
                "autoscalerOptions": AUTOSCALER_OPTIONS,
                "headGroupSpec": HEAD_GROUP,
                "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP},
                "headServiceAnnotations": STRING_MAP,
                "suspend": {"type": "boolean"},
                "managedBy": {"type": "string"},
            },
        },
    },
}
