"""Operator credentials: SCRAM-SHA-256 verifiers and TOTP codes.

Verifiers use PostgreSQL's pg_authid format
(``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>``), so the proxy's
SCRAM exchange with psql works on the same stored value.  ``make_verifier``
comes from ``proxy.scram`` when that module exists (helper H1); otherwise a
private implementation on scramp is used.  Checking a plain password against
a verifier (for the CLI) is done here with hashlib, in constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

import pyotp

DEFAULT_ITERATIONS = 4096


def _own_make_verifier(password: str, iterations: int = DEFAULT_ITERATIONS) -> str:
    from scramp import ScramMechanism

    salt, stored_key, server_key, iters = ScramMechanism("SCRAM-SHA-256").make_auth_info(
        password, iteration_count=iterations
    )
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iters}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def make_verifier(password: str) -> str:
    if not password:
        raise ValueError("the password must not be empty")
    try:
        from proxy.scram import make_verifier as shared_make_verifier  # helper H1's module
    except ImportError:
        return _own_make_verifier(password)
    return shared_make_verifier(password)


def _saslprep(password: str) -> str:
    try:
        from scramp.utils import saslprep

        return saslprep(password)
    except Exception:  # PostgreSQL falls back to the raw bytes when SASLprep fails
        return password


def check_password(verifier: str, password: str) -> bool:
    """True when ``password`` matches a PostgreSQL-format SCRAM-SHA-256 verifier."""
    try:
        mech, rest = verifier.split("$", 1)
        iter_salt, keys = rest.split("$", 1)
        iters_s, salt_b64 = iter_salt.split(":", 1)
        stored_b64, _server_b64 = keys.split(":", 1)
        if mech != "SCRAM-SHA-256":
            return False
        salt = base64.b64decode(salt_b64)
        stored_key = base64.b64decode(stored_b64)
        iterations = int(iters_s)
    except ValueError:
        return False
    salted = hashlib.pbkdf2_hmac("sha256", _saslprep(password).encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    return hmac.compare_digest(hashlib.sha256(client_key).digest(), stored_key)


def new_totp_secret() -> str:
    return pyotp.random_base32()


def totp_uri(secret: str, name: str, issuer: str = "tenantgate") -> str:
    return pyotp.TOTP(secret).provisioning_uri(name=name, issuer_name=issuer)


def check_totp(secret: str, code: str | None) -> bool:
    """Accept the current code and the one before or after it (clock skew)."""
    if not code:
        return False
    code = code.strip().replace(" ", "")
    if not code.isdigit():
        return False
    return pyotp.TOTP(secret).verify(code, valid_window=1)
