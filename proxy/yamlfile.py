"""Loading the YAML files tenantgate reads (config, rules, allowlists) with errors that name the file and key."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError


def load_mapping(path: str | Path, error: type[Exception]) -> dict:
    """The YAML mapping in ``path``; any problem raises ``error`` with a message naming the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{path}: the top level must be a mapping")
    return data


def format_validation_error(err: ValidationError, source: str, what: str = "configuration") -> str:
    """One line per bad key: ``  backend.port: Input should be a valid integer``."""
    lines = [f"{source}: invalid {what}"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)
