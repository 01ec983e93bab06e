"""Every import in proxy/, tests/ and bench/ resolves, function-local ones included.

Function-local imports run only when their function does, so a module move can leave one
broken that no other test reaches for a while (this happened when the control plane was
split).  This imports each named module and looks up each imported name.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports():
    for tree_root in ("proxy", "tests", "bench"):
        for path in sorted((ROOT / tree_root).rglob("*.py")):
            rel = path.relative_to(ROOT)
            package = ".".join(rel.with_suffix("").parts[:-1])
            for node in ast.walk(ast.parse(path.read_text(), str(rel))):
                if not isinstance(node, ast.ImportFrom):
                    continue
                module = node.module or ""
                if node.level:
                    if tree_root == "tests":
                        continue  # tests/ is not a package (support modules import each other absolutely)
                    parts = package.split(".")
                    module = ".".join(parts[:len(parts) - node.level + 1] + ([module] if module else []))
                yield f"{rel}:{node.lineno}", module, [a.name for a in node.names if a.name != "*"]


def test_every_imported_module_and_name_exists():
    broken = []
    for where, module, names in _imports():
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            broken.append(f"{where}: {module}: {e}")
            continue
        for name in names:
            if not hasattr(mod, name):
                try:
                    importlib.import_module(f"{module}.{name}")
                except ImportError:
                    broken.append(f"{where}: {module} has no {name}")
    assert not broken, "\n".join(broken)
