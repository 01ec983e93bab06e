"""`tenantgate demo` (not yet implemented)."""


def register(sub):
    p = sub.add_parser("demo", help="(not yet implemented)")
    p.set_defaults(func=lambda args: (print("tenantgate demo: not yet implemented"), 2)[1])
