#!/usr/bin/env python3
"""CI check of contrib/kubernetes: every YAML file parses, every document is a Kubernetes
object (apiVersion, kind, a name; a Kustomization's resources exist), and each Deployment
of holdfast gives its pods a termination grace period that covers the preStop sleep plus the
drain it asks for (--drain-timeout + --close-spread + 2 s of FIN linger).

No schema validator: those that install from the package registries fetch their schemas
from the internet at run time. This is a parse plus the checks above."""

import pathlib
import re
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent / "contrib" / "kubernetes"
LINGER = 2.0  # seconds: src/session LINGER_TIMEOUT
UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


def seconds(text):
    total, rest = 0.0, text.strip()
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)", rest):
        total += float(number) * UNITS[unit]
    if rest == "0":
        return 0.0
    if not re.fullmatch(r"(\d+(?:\.\d+)?\s*(ms|s|m|h)\s*)+", rest):
        raise ValueError(f"not a duration: {text!r}")
    return total


def flag(args, name, default):
    for i, arg in enumerate(args):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(args):
            return args[i + 1]
    return default


def check_deployment(path, doc, errors):
    spec = doc["spec"]["template"]["spec"]
    grace = spec.get("terminationGracePeriodSeconds", 30)
    for container in spec["containers"]:
        args = container.get("args", [])
        if "holdfast" not in container.get("image", ""):
            continue
        drain = seconds(flag(args, "drain-timeout", "30s"))
        spread = seconds(flag(args, "close-spread", "10s"))
        pre_stop = container.get("lifecycle", {}).get("preStop", {})
        sleep = pre_stop.get("sleep", {}).get("seconds", 0)
        needed = sleep + drain + spread + LINGER
        if grace < needed:
            errors.append(
                f"{path}: terminationGracePeriodSeconds {grace} < preStop sleep {sleep} + "
                f"--drain-timeout {drain:g} + --close-spread {spread:g} + {LINGER:g}"
            )
        probe = container.get("livenessProbe", {}).get("httpGet", {})
        if probe.get("path") == "/healthz":
            errors.append(f"{path}: /healthz as liveness kills a draining holdfast")


def main():
    errors = []
    files = sorted(ROOT.glob("*.yaml")) + sorted(ROOT.glob("*.yml"))
    if not files:
        errors.append(f"no YAML under {ROOT}")
    for path in files:
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        except yaml.YAMLError as e:
            errors.append(f"{path}: {e}")
            continue
        for doc in docs:
            if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
                errors.append(f"{path}: a document without apiVersion and kind")
                continue
            if doc["kind"] == "Kustomization":
                for resource in doc.get("resources", []):
                    if not (ROOT / resource).exists():
                        errors.append(f"{path}: resource {resource} does not exist")
                continue
            if not doc.get("metadata", {}).get("name"):
                errors.append(f"{path}: a {doc['kind']} without metadata.name")
            if doc["kind"] == "Deployment":
                check_deployment(path, doc, errors)
        print(f"ok: {path.relative_to(ROOT.parent.parent)} ({len(docs)} documents)")
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
