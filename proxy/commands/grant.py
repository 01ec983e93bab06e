"""`tenantgate grant` (not yet implemented)."""


def register(sub):
    p = sub.add_parser("grant", help="(not yet implemented)")
    p.set_defaults(func=lambda args: (print("tenantgate grant: not yet implemented"), 2)[1])
