"""No import circles between proxy's modules, function-local imports included.

A circle hidden by a function-local import still couples both modules; import-linter's contracts
(pyproject.toml, run by `make lint`) check packages, this checks every module pair.  Imports under
``if TYPE_CHECKING:`` do not run and are left out.
"""

from __future__ import annotations

import grimp


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_the_cycle_finder_finds_a_cycle():
    g = grimp.ImportGraph()
    for a, b in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d")):
        g.add_import(importer=a, imported=b)
    assert _cycles(g) == [["p.a", "p.b", "p.c"]]


def test_proxy_has_no_import_circles():
    graph = grimp.build_graph("proxy", exclude_type_checking_imports=True, cache_dir=None)
    cycles = _cycles(graph)
    details = []
    for comp in cycles:
        for a in comp:
            for b in sorted(graph.find_modules_directly_imported_by(a)):
                if b in comp:
                    lines = sorted(d["line_number"] for d in graph.get_import_details(importer=a, imported=b))
                    details.append(f"{a} -> {b} (line {', '.join(map(str, lines))})")
    assert not cycles, "import circles:\n" + "\n".join(details)
