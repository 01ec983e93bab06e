"""`tenantgate tenant` (not yet implemented)."""


def register(sub):
    p = sub.add_parser("tenant", help="(not yet implemented)")
    p.set_defaults(func=lambda args: (print("tenantgate tenant: not yet implemented"), 2)[1])
