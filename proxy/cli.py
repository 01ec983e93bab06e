"""The ``tenantgate`` command.  Each subcommand lives in ``proxy/commands/<name>.py``
and exposes ``register(subparsers)``, which adds its parser and sets ``func``."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ["serve", "demo", "passwd", "doctor", "operator", "grant", "audit", "receipt", "tenant", "export", "notices", "demand",
            "config_schema"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tenantgate", description="PostgreSQL proxy for safe multi-tenant PostgreSQL")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"proxy.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from proxy.textsafe import install

    install()  # every byte the CLI prints is escaped for the terminal (proxy/textsafe.py)
    parser = build_parser()
    args = parser.parse_args(argv)
    rc = args.func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
