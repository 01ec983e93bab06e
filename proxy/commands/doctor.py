"""`tenantgate doctor` (not yet implemented)."""


def register(sub):
    p = sub.add_parser("doctor", help="(not yet implemented)")
    p.set_defaults(func=lambda args: (print("tenantgate doctor: not yet implemented"), 2)[1])
