"""tenantgate: a PostgreSQL wire-protocol proxy for safe multi-tenant PostgreSQL."""

__version__ = "0.1.0"
