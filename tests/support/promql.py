"""Metric names: what tenantgate exports, and what a PromQL expression (alert, dashboard) refers to."""

from __future__ import annotations

import re

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
                "offset", "bool", "inf", "nan"}


def exported_metric_names() -> set[str]:
    """Every series name tenantgate's process exports (from the real registry)."""
    import proxy.metrics  # noqa: F401 - registers the metrics
    from prometheus_client import REGISTRY, generate_latest

    names = {"up"}
    for line in generate_latest(REGISTRY).decode().splitlines():
        if not line.startswith("# TYPE "):
            continue
        _, _, name, kind = line.split()
        if name.endswith("_created"):
            continue
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


def promql_metric_names(expr: str) -> set[str]:
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\$\w+", " ", expr)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if expr[m.end():].lstrip().startswith("(") or m.group(0).lower() in PROMQL_WORDS:
            continue
        names.add(m.group(0))
    return names
