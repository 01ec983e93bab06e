"""The session resets that drivers and poolers send, answered with their PostgreSQL meaning.

asyncpg's ``Pool`` ends every lease with ``SELECT pg_advisory_unlock_all(); CLOSE ALL;
UNLISTEN *; RESET ALL``; PgBouncer-style poolers and some frameworks send ``DISCARD ALL``.
Each means "forget this client's session state", and in a tenant session that state is the
client's own (its settings, cursors and prepared statements), never the tenant binding, which
lives in the PostgreSQL backstop's table (proxy/backstop.py), not in anything a reset touches:

* ``RESET ALL`` / ``DISCARD ALL`` reset the client's settings; transaction pooling reads the
  settings back afterwards and puts the proxy's own (tenant GUC, backstop binding) and the
  client's connection-time settings back on the next transaction, as PostgreSQL's reset values
  would (``Forward.resets_settings``);
* ``UNLISTEN`` is harmless: a tenant session cannot LISTEN, so there is nothing to unlisten;
* ``pg_advisory_unlock_all()``: a tenant session cannot take advisory locks (they are a
  database-wide namespace shared by every tenant), so it holds none and the call has nothing to
  release.  The statement ``SELECT pg_advisory_unlock_all()`` (exactly that, optionally
  schema-qualified) is answered by ``SELECT ''::pg_catalog.void AS pg_advisory_unlock_all``: the
  same column name, type and value as PostgreSQL's answer, without calling the function.

Entry point: :func:`advisory_unlock_all_piece` (``None`` when the statement is anything else).
This module works on PostgreSQL's own tokens (:mod:`proxy.policy.lexer`).
"""

from __future__ import annotations

from proxy.policy.edits import Edit
from proxy.policy.lexer import tokens_in
from proxy.policy.statement_result import Piece

UNLOCK_ALL_ANSWER = "SELECT ''::pg_catalog.void AS pg_advisory_unlock_all"


def _text(sql: str, t) -> str:
    return sql[t.start : t.end]


def advisory_unlock_all_piece(sql: str, start: int, end: int) -> Piece | None:
    """The Piece answering ``SELECT [pg_catalog.]pg_advisory_unlock_all()``, or None."""
    toks = tokens_in(sql, start, end)
    if toks and toks[-1].name == "ASCII_59":  # a trailing ';'
        toks = toks[:-1]
    words = [_text(sql, t) for t in toks]
    if len(words) == 6 and toks[1].name == "IDENT" and words[1].lower() == "pg_catalog" and words[2] == ".":
        words = [words[0]] + words[3:]
        toks = [toks[0]] + toks[3:]
    if len(words) != 4:
        return None
    select, name, lpar, rpar = toks
    if select.name != "SELECT" or name.name != "IDENT" or lpar.name != "ASCII_40" or rpar.name != "ASCII_41":
        return None
    if _text(sql, name).lower() != "pg_advisory_unlock_all":  # unquoted: PostgreSQL folds it
        return None
    return Piece(edits=[Edit(toks[0].start, toks[-1].end, (UNLOCK_ALL_ANSWER,))], statement_class="other")
