"""`tenantgate operator` (not yet implemented)."""


def register(sub):
    p = sub.add_parser("operator", help="(not yet implemented)")
    p.set_defaults(func=lambda args: (print("tenantgate operator: not yet implemented"), 2)[1])
