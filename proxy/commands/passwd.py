"""`tenantgate passwd [USER]`: make a SCRAM-SHA-256 verifier for tenantgate's user registry.

Reads the password twice from a terminal, or one line from stdin otherwise,
and prints the verifier (or, with a USER, a ready-to-paste ``users:`` entry).
Only the verifier is stored in the config; the password itself never is.
"""

from __future__ import annotations

import getpass
import sys

from proxy.scram import DEFAULT_ITERATIONS, make_verifier


def read_password(stdin=None, *, tty: bool | None = None) -> str:
    stdin = stdin or sys.stdin
    if tty is None:
        tty = stdin.isatty()
    if tty:
        first = getpass.getpass("Password: ")
        second = getpass.getpass("Repeat password: ")
        if first != second:
            raise ValueError("the passwords do not match")
        pw = first
    else:
        pw = stdin.readline().rstrip("\r\n")
    if not pw:
        raise ValueError("empty password")
    return pw


def run(args) -> int:
    try:
        pw = read_password()
    except (ValueError, EOFError, KeyboardInterrupt) as e:
        print(f"tenantgate passwd: {e or 'aborted'}", file=sys.stderr)
        return 1
    verifier = make_verifier(pw, iterations=args.iterations)
    if args.user:
        print("users:")
        print(f"  - name: {args.user}")
        print(f'    scram_verifier: "{verifier}"')
    else:
        print(verifier)
    return 0


def register(sub):
    p = sub.add_parser("passwd", help="make a SCRAM-SHA-256 verifier for a tenantgate user")
    p.add_argument("user", nargs="?", help="print a users: config entry for this user name")
    p.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS, help="PBKDF2 iterations (default 4096)")
    p.set_defaults(func=run)
