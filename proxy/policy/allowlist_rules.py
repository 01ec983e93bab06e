"""The allowlist's data: rules/functions.yaml and rules/catalogs.yaml, loaded and looked up.

:func:`load_function_allowlist` and :func:`load_catalog_rules` read the reviewable lists under
``rules/``; :func:`typed_function_names` maps sqlglot's typed function nodes to the PostgreSQL
names they stand for.  The checker that applies them to a statement tree is
:class:`proxy.policy.allowlist.FunctionChecker`.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import sqlglot
from sqlglot import exp

from proxy.policy.errors import INSUFFICIENT_PRIVILEGE, PolicyRefusal
from proxy.yamlfile import load_mapping

SYSTEM_SCHEMAS = ("pg_catalog", "information_schema")


class AllowlistError(Exception):
    """A rules file for the allowlist is missing or malformed (message names the file and key)."""


def default_rules_dir() -> Path:
    """``$TENANTGATE_RULES_DIR`` if set, else the repository's ``rules/`` directory (next to ``proxy/``)."""
    env = os.environ.get("TENANTGATE_RULES_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "rules"


def fold_identifier(name: str, quoted: bool) -> str:
    """PostgreSQL's case folding: unquoted identifiers lose ASCII upper case, quoted ones are exact."""
    if quoted:
        return name
    if name.isascii():
        return name.lower()
    return "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else c for c in name)


#: exclusion groups (rules/functions.yaml) that reach the server's storage: refusal reason "storage"
STORAGE_GROUPS = frozenset({"server_files", "adminpack_writers", "large_objects"})


def _refuse(message: str, *, hint: str | None = None, reason: str = "function") -> PolicyRefusal:
    """A 42501 refusal; ``reason`` (proxy.policy.refusal_reason) is "function" unless the caller says otherwise."""
    return PolicyRefusal(INSUFFICIENT_PRIVILEGE, message, hint=hint, reason=reason)


def _group_reason(group) -> str:
    return "storage" if group.name in STORAGE_GROUPS else "function"


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class ExclusionGroup:
    name: str
    reason: str
    functions: frozenset[str]
    patterns: tuple[str, ...]
    _regex: re.Pattern | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.patterns:
            joined = "|".join(fnmatch.translate(p) for p in self.patterns)
            object.__setattr__(self, "_regex", re.compile(joined))

    def matches(self, fname: str) -> bool:
        return fname in self.functions or (self._regex is not None and self._regex.match(fname) is not None)


@dataclass(frozen=True)
class FunctionAllowlist:
    """Built-in functions: allowed names (by category) and exclusion groups (with reasons)."""

    allowed: dict[str, str]  # function name -> category
    exclusions: tuple[ExclusionGroup, ...]
    set_config_safe_parameters: frozenset[str]

    def exclusion(self, fname: str) -> ExclusionGroup | None:
        cache = self.__dict__.setdefault("_exclusion_cache", {})
        try:
            return cache[fname]
        except KeyError:
            pass
        found = next((g for g in self.exclusions if g.matches(fname)), None)
        if len(cache) < 100_000:
            cache[fname] = found
        return found

    def known(self, fname: str) -> bool:
        return fname in self.allowed or self.exclusion(fname) is not None


@dataclass(frozen=True)
class CatalogRules:
    """System catalog relations: allowed, denied (exact names and glob patterns, with reasons)."""

    allowed: dict[str, frozenset[str]]  # schema -> names
    denied: dict[str, dict[str, str]]  # schema -> name or pattern -> reason
    control_schemas: frozenset[str] = frozenset({"tenantgate_control"})
    denied_in_any_schema: dict[str, str] = field(default_factory=dict)  # extension relations

    def __post_init__(self) -> None:
        patterns = {
            schema: tuple((re.compile(fnmatch.translate(p)), reason) for p, reason in entries.items()
                          if any(ch in p for ch in "*?["))
            for schema, entries in self.denied.items()
        }
        object.__setattr__(self, "_patterns", patterns)

    def denial(self, schema: str, name: str) -> str | None:
        if name in self.denied_in_any_schema:
            return self.denied_in_any_schema[name]
        entries = self.denied.get(schema)
        if not entries:
            return None
        if name in entries:
            return entries[name]
        for regex, reason in self._patterns.get(schema, ()):
            if regex.match(name):
                return reason
        return None

    def is_catalog_name(self, name: str) -> bool:
        """True when an unqualified ``name`` would resolve into pg_catalog (or looks like it would)."""
        return (
            name.startswith("pg_")
            or name in self.allowed.get("pg_catalog", frozenset())
            or self.denial("pg_catalog", name) is not None
        )


def _load_yaml(path: Path) -> dict:
    return load_mapping(path, AllowlistError)


def _str_list(value, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AllowlistError(f"{where}: must be a list of strings")
    return value


def load_function_allowlist(path: str | Path | None = None) -> FunctionAllowlist:
    path = Path(path) if path else default_rules_dir() / "functions.yaml"
    data = _load_yaml(path)
    allowed: dict[str, str] = {}
    for cat, body in (data.get("allowed") or {}).items():
        if not isinstance(body, dict):
            raise AllowlistError(f"{path}: allowed.{cat}: must be a mapping with `functions`")
        for fname in _str_list(body.get("functions", []), f"{path}: allowed.{cat}.functions"):
            allowed[fname] = cat
    groups = []
    for gname, body in (data.get("excluded") or {}).items():
        if not isinstance(body, dict) or not isinstance(body.get("reason"), str) or not body["reason"].strip():
            raise AllowlistError(f"{path}: excluded.{gname}.reason: every exclusion group needs a reason")
        groups.append(ExclusionGroup(
            name=gname,
            reason=body["reason"],
            functions=frozenset(_str_list(body.get("functions", []), f"{path}: excluded.{gname}.functions")),
            patterns=tuple(_str_list(body.get("patterns", []), f"{path}: excluded.{gname}.patterns")),
        ))
    both = [f for f in allowed if any(g.matches(f) for g in groups)]
    if both:
        raise AllowlistError(f"{path}: functions both allowed and excluded: {', '.join(sorted(both)[:20])}")
    safe = _str_list(data.get("set_config_safe_parameters", []), f"{path}: set_config_safe_parameters")
    return FunctionAllowlist(allowed, tuple(groups), frozenset(p.lower() for p in safe))


def load_catalog_rules(path: str | Path | None = None) -> CatalogRules:
    path = Path(path) if path else default_rules_dir() / "catalogs.yaml"
    data = _load_yaml(path)
    allowed = {}
    for schema, names in (data.get("allowed") or {}).items():
        allowed[schema] = frozenset(_str_list(names, f"{path}: allowed.{schema}"))
    denied: dict[str, dict[str, str]] = {}
    for schema, entries in (data.get("denied") or {}).items():
        if not isinstance(entries, dict):
            raise AllowlistError(f"{path}: denied.{schema}: must map relation name -> reason")
        for name, reason in entries.items():
            if not isinstance(reason, str) or not reason.strip():
                raise AllowlistError(f"{path}: denied.{schema}.{name}: needs a reason")
        denied[schema] = dict(entries)
    for schema in set(allowed) | set(denied):
        if schema not in SYSTEM_SCHEMAS:
            raise AllowlistError(f"{path}: {schema}: only pg_catalog and information_schema can be listed")
        overlap = allowed.get(schema, frozenset()) & set(denied.get(schema, {}))
        if overlap:
            raise AllowlistError(f"{path}: {schema}: both allowed and denied: {', '.join(sorted(overlap))}")
    control = frozenset(_str_list(data.get("control_schemas", ["tenantgate_control"]), f"{path}: control_schemas"))
    anywhere = data.get("denied_in_any_schema") or {}
    if not isinstance(anywhere, dict) or not all(isinstance(v, str) and v.strip() for v in anywhere.values()):
        raise AllowlistError(f"{path}: denied_in_any_schema: must map relation name -> reason")
    return CatalogRules(allowed, denied, control, dict(anywhere))


# ----------------------------------------------------------------------------- sqlglot typed functions

# sqlglot classes for constructs PostgreSQL evaluates as SQL syntax (not as a call of a catalog
# function that could be dangerous).  Reviewed: none of them reads files, runs SQL text or leaks state.
SQL_SYNTAX_CLASSES: frozenset[type] = frozenset(
    c for c in (
        getattr(exp, n, None) for n in (
            "Case", "If", "Coalesce", "Nullif", "Greatest", "Least", "Exists", "Array", "Grouping",
            "Collate", "CurrentCatalog", "CurrentDate", "CurrentTime", "CurrentTimestamp", "CurrentUser",
            "CurrentRole", "CurrentSchema", "SessionUser", "Localtime", "Localtimestamp", "XMLElement", "XMLTable",
            "Cast", "Extract", "Trim", "Substring", "StrPosition", "Overlay", "Normalize", "MatchAgainst",
            "Struct", "Interval", "AtTimeZone", "Bracket", "JSONExtract", "JSONExtractScalar",
            "JSONBExtract", "JSONBExtractScalar", "Count", "Max", "Min", "Sum", "Avg",
        )
    ) if c is not None
)

_PROBE_ARGS = ("", "a", "a, b", "a, b, c")


def sqlglot_function_names() -> frozenset[str]:
    """Every function name the postgres dialect's parser turns into something other than exp.Anonymous."""
    from sqlglot.dialects.postgres import Postgres

    parser = Postgres.Parser
    return frozenset(n.lower() for n in set(parser.FUNCTIONS) | set(parser.FUNCTION_PARSERS))


@functools.lru_cache(maxsize=8)
def typed_function_names(names: frozenset[str] | None = None) -> dict[type, frozenset[str]]:
    """Map each typed sqlglot function class to the (lower-case) names whose call parses into it.

    Built by parsing ``SELECT name(...)`` and ``SELECT * FROM name(...)`` with 0
    to 3 arguments for each of ``names`` (default: every name sqlglot's postgres
    parser knows; the checker passes only the names PostgreSQL has, which gives
    the same decisions, faster).  Cached per process.
    """
    if names is None:
        names = sqlglot_function_names()
    found: dict[type, set[str]] = {}
    log = logging.getLogger("sqlglot")
    old_level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        for name in sorted(names):
            if not name.replace("_", "").isalnum():
                continue
            for template in ("SELECT {}({})", "SELECT * FROM {}({})"):
                for args in _PROBE_ARGS:
                    try:
                        tree = sqlglot.parse_one(template.format(name, args), read="postgres")
                    except Exception:  # noqa: BLE001 - a name that needs other syntax
                        continue
                    if not isinstance(tree, exp.Select):
                        continue
                    from_ = tree.args.get("from_") or tree.args.get("from")
                    node = from_.this if template.startswith("SELECT *") and from_ else (
                        tree.expressions[0] if tree.expressions else None)
                    if isinstance(node, exp.Table):
                        node = node.this
                    if isinstance(node, exp.Func) and not isinstance(node, (exp.Anonymous, exp.AnonymousAggFunc)):
                        found.setdefault(type(node), set()).add(name.lower())
        for kw in ("CURRENT_USER", "SESSION_USER", "CURRENT_ROLE", "CURRENT_SCHEMA", "CURRENT_CATALOG",
                   "CURRENT_DATE", "CURRENT_TIME", "CURRENT_TIMESTAMP", "LOCALTIME", "LOCALTIMESTAMP", "USER"):
            tree = sqlglot.parse_one(f"SELECT {kw}", read="postgres")
            node = tree.expressions[0]
            if isinstance(node, exp.Func):
                found.setdefault(type(node), set()).add(kw.lower())
    finally:
        log.setLevel(old_level)
    return {cls: frozenset(ns) for cls, ns in found.items()}
