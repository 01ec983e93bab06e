"""What ``tenantgate operator|grant|audit`` share: config, the control plane, the acting person, output.

The acting person is always proven, never taken from a flag alone:
``--as NAME`` plus the password, read from the terminal (no echo) or, with
``--password-stdin``, from the first line of standard input; plus
``--totp CODE`` when that person has TOTP enrolled.  Commands that need a
second secret (a new account's password) read it next: a second prompt, or
the next line of standard input.

Exit status: 0 ok, 1 refused / failed / verification failure, 2 usage or
configuration error.  ``--json`` prints machine-readable output.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import sys
from contextlib import asynccontextmanager
from typing import Any, Awaitable, Callable

from proxy.config import Config, ConfigError, load_config

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    pass


def add_config_arg(p) -> None:
    p.add_argument("--config", default=os.environ.get("TENANTGATE_CONFIG"), metavar="FILE",
                   help="tenantgate config file with control.dsn (default: $TENANTGATE_CONFIG)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def add_actor_args(p, *, required: bool = True) -> None:
    p.add_argument("--as", dest="actor", required=required, metavar="NAME",
                   help="who is acting (proven by password, and TOTP when enrolled)")
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password(s) from standard input, one per line, instead of a prompt")
    p.add_argument("--totp", metavar="CODE", help="current TOTP code (required when enrolled)")


def read_secret(args, prompt: str, *, confirm: bool = False) -> str:
    """A password: the next stdin line with --password-stdin, else a no-echo terminal prompt."""
    if getattr(args, "password_stdin", False):
        if getattr(args, "_stdin_lines", None) is None:
            args._stdin_lines = iter(sys.stdin.read().splitlines())
        value = next(args._stdin_lines, None)
        if value is None:
            raise UsageError(f"--password-stdin: standard input has no line for: {prompt.strip(': ')}")
        return value
    if not sys.stdin.isatty():
        raise UsageError("no terminal to ask for a password: use --password-stdin")
    value = getpass.getpass(prompt)
    if confirm and getpass.getpass("again: ") != value:
        raise UsageError("the passwords do not match")
    return value


def load(args) -> Config:
    if not args.config:
        raise UsageError("--config FILE is required (or set TENANTGATE_CONFIG)")
    return load_config(args.config)


@asynccontextmanager
async def control_plane(args, *, install: bool = False):
    from proxy.control.plane import ControlPlane

    cfg = load(args)
    plane = ControlPlane.from_config(cfg, pool_max_size=2)
    await plane.start(install=install)
    try:
        yield plane
    finally:
        await plane.close()


async def authenticate(plane, args):
    password = read_secret(args, f"password for {args.actor}: ")
    return await plane.authenticate_actor(args.actor, password, args.totp)


def emit(args, data: Any, human: str | Callable[[], str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        from proxy.textsafe import safe_lines

        print(safe_lines(human() if callable(human) else human))


def table(headers: list[str], rows: list[list[Any]]) -> str:
    from proxy.textsafe import safe_text

    cells = [[safe_text(v) for v in r] for r in rows]  # one cell, one line: no control character survives
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)


def run(args, fn: Callable[[Any], Awaitable[int | None]]) -> int:
    """Run an async command body and map errors to messages and exit codes."""
    from proxy.control.audit import AuditWriteError
    from proxy.control.model import ControlError

    try:
        return int(asyncio.run(fn(args)) or EXIT_OK)
    except (UsageError, ConfigError, ValueError) as e:
        print(f"tenantgate {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ControlError as e:
        print(f"tenantgate {args.command}: {e}", file=sys.stderr)
        return EXIT_FAIL
    except AuditWriteError as e:
        print(f"tenantgate {args.command}: refused: {e}", file=sys.stderr)
        return EXIT_FAIL
    except (OSError, Exception) as e:  # e.g. the control database is unreachable
        if e.__class__.__module__.startswith("asyncpg") or isinstance(e, OSError):
            print(f"tenantgate {args.command}: control database error: {e}", file=sys.stderr)
            return EXIT_FAIL
        raise
    except KeyboardInterrupt:
        return EXIT_FAIL
