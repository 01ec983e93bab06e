"""`tenantgate audit` (not yet implemented)."""


def register(sub):
    p = sub.add_parser("audit", help="(not yet implemented)")
    p.set_defaults(func=lambda args: (print("tenantgate audit: not yet implemented"), 2)[1])
