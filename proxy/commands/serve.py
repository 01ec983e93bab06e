"""`tenantgate serve` (not yet implemented)."""


def register(sub):
    p = sub.add_parser("serve", help="(not yet implemented)")
    p.set_defaults(func=lambda args: (print("tenantgate serve: not yet implemented"), 2)[1])
