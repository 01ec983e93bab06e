"""`tenantgate passwd` (not yet implemented)."""


def register(sub):
    p = sub.add_parser("passwd", help="(not yet implemented)")
    p.set_defaults(func=lambda args: (print("tenantgate passwd: not yet implemented"), 2)[1])
