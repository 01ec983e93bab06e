"""Pass 2: which statement kinds a tenant session may run, and their class.

Allowed (parsed by sqlglot): SELECT (incl. VALUES, TABLE, set operations, WITH, FOR
UPDATE/SHARE), INSERT, UPDATE, DELETE, MERGE.  Allowed (parsed by utility_statements.py): see that module.
Everything else is refused with 42501 naming the statement (DDL, GRANT, LISTEN/NOTIFY, DO,
CALL, VACUUM, LOCK, SELECT INTO, ...), or 0A000 when the proxy does not support it.

Entry point: :func:`classify` -> ``(statement_class, writes)``.
"""

from __future__ import annotations

from sqlglot import exp

from proxy.policy.errors import FEATURE_NOT_SUPPORTED, INSUFFICIENT_PRIVILEGE, PolicyRefusal

_READ_ROOTS = (exp.Select, exp.SetOperation, exp.Values)
_WRITE_ROOTS = (exp.Insert, exp.Update, exp.Delete, exp.Merge)

REFUSED_KEYWORDS = {
    "CREATE": "DDL", "ALTER": "DDL", "DROP": "DDL", "TRUNCATE": "TRUNCATE", "COMMENT": "DDL",
    "GRANT": "GRANT", "REVOKE": "REVOKE", "SECURITY": "DDL", "REINDEX": "maintenance", "CLUSTER": "maintenance",
    "VACUUM": "maintenance", "ANALYZE": "maintenance", "ANALYSE": "maintenance", "CHECKPOINT": "maintenance",
    "REFRESH": "maintenance", "LOCK": "LOCK", "LISTEN": "LISTEN/NOTIFY", "NOTIFY": "LISTEN/NOTIFY",
    "DO": "DO blocks", "CALL": "CALL", "LOAD": "LOAD", "IMPORT": "DDL",
    "REASSIGN": "DDL",
}


def refuse_keyword(keyword: str) -> None:
    what = REFUSED_KEYWORDS.get(keyword)
    if what is None:
        return
    raise PolicyRefusal(
        INSUFFICIENT_PRIVILEGE, f"{keyword} is not allowed in a tenant session ({what} is refused by tenantgate)",
        reason="unsupported",
    )


def classify(tree: exp.Expression, keyword: str) -> tuple[str, bool]:
    root = tree
    while isinstance(root, exp.Subquery) and not root.args.get("alias"):
        root = root.this  # (SELECT ...) as a whole statement
    if isinstance(root, _WRITE_ROOTS):
        cls, writes = "write", True
    elif isinstance(root, _READ_ROOTS):
        cls, writes = "read", False
    else:
        name = keyword if keyword.isalpha() else type(tree).__name__.upper()
        raise PolicyRefusal(INSUFFICIENT_PRIVILEGE, f"{name} statements are not allowed in a tenant session")
    for node in tree.walk():
        if isinstance(node, exp.Select) and node.args.get("into"):
            raise PolicyRefusal(INSUFFICIENT_PRIVILEGE, "SELECT INTO creates a table and is not allowed in a tenant session")
        if isinstance(node, _WRITE_ROOTS):
            cls, writes = "write", True
        elif isinstance(node, exp.Lock):
            writes = True  # FOR UPDATE/SHARE takes row locks: not in read-only sessions
        elif isinstance(node, exp.Command):
            raise PolicyRefusal(FEATURE_NOT_SUPPORTED, f"{type(node).__name__.upper()} is not supported here")
    return cls, writes
