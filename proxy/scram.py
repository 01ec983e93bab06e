"""Password authentication: SCRAM-SHA-256 verifiers, both SCRAM sides, md5.

* :func:`make_verifier` turns a password into a verifier in PostgreSQL's
  pg_authid format (``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>``);
  tenantgate's user registry stores only these.
* :class:`ScramServerExchange` runs the server side toward clients against a
  stored verifier (no password needed).
* :class:`ScramClientExchange` runs the client side toward PostgreSQL.
* :func:`md5_password` answers PostgreSQL's AuthenticationMD5Password.

The SCRAM mathematics and SASLprep are done by ``scramp``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass

import scramp

MECHANISM = "SCRAM-SHA-256"
DEFAULT_ITERATIONS = 4096


class ScramError(Exception):
    pass


@dataclass(frozen=True)
class Verifier:
    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    def auth_info(self) -> tuple[bytes, bytes, bytes, int]:
        return self.salt, self.stored_key, self.server_key, self.iterations


def make_verifier(password: str, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None) -> str:
    """A SCRAM-SHA-256 verifier for ``password`` in pg_authid format."""
    mech = scramp.ScramMechanism(MECHANISM)
    salt_b, stored, server, i = mech.make_auth_info(password, iteration_count=iterations, salt=salt)
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"{MECHANISM}${i}:{b64(salt_b)}${b64(stored)}:{b64(server)}"


def parse_verifier(text: str) -> Verifier:
    try:
        mech, iter_salt, keys = text.split("$")
        if mech != MECHANISM:
            raise ValueError("not SCRAM-SHA-256")
        it, salt = iter_salt.split(":")
        stored, server = keys.split(":")
        v = Verifier(int(it), base64.b64decode(salt, validate=True), base64.b64decode(stored, validate=True),
                     base64.b64decode(server, validate=True))
    except (ValueError, TypeError) as e:
        raise ScramError(f"invalid SCRAM verifier: {e}") from None
    if v.iterations < 1 or len(v.stored_key) != 32 or len(v.server_key) != 32 or not v.salt:
        raise ScramError("invalid SCRAM verifier")
    return v


_MOCK_SECRET = os.urandom(32)


def mock_verifier(user: str) -> Verifier:
    """A stable fake verifier for unknown users, so the exchange does not reveal
    whether a user exists (PostgreSQL does the same)."""
    d = hmac.new(_MOCK_SECRET, user.encode(), hashlib.sha256).digest()
    return Verifier(DEFAULT_ITERATIONS, d[:16], hmac.new(d, b"s", hashlib.sha256).digest(),
                    hmac.new(d, b"k", hashlib.sha256).digest())


class ScramServerExchange:
    """Server side of SCRAM-SHA-256 (RFC 5802/7677, no channel binding) against
    a stored verifier: no password is needed, only StoredKey and ServerKey.

    Written here rather than with ``scramp``'s server because PostgreSQL
    clients send an empty user name (``n=``) in client-first, which scramp's
    server rejects.  Usage: ``server_first = ex.client_first(data)``, then
    ``server_final = ex.client_final(data)``, which raises :class:`ScramError`
    when the proof is wrong.  ``always_fail`` makes the exchange fail at the
    end (unknown user) after looking like a normal one.
    """

    def __init__(self, verifier: Verifier, *, always_fail: bool = False):
        self._v = verifier
        self._always_fail = always_fail
        self._nonce = ""
        self._client_first_bare = ""
        self._server_first = ""
        self._gs2 = ""

    @staticmethod
    def _attrs(text: str) -> list[tuple[str, str]]:
        out = []
        for part in text.split(","):
            if len(part) < 2 or part[1] != "=":
                raise ScramError("malformed SCRAM message")
            out.append((part[0], part[2:]))
        return out

    def client_first(self, data: bytes) -> bytes:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ScramError("malformed SCRAM message: not UTF-8") from None
        parts = text.split(",", 2)
        if len(parts) != 3:
            raise ScramError("malformed SCRAM message: bad gs2 header")
        flag, authzid, bare = parts
        if flag.startswith("p="):
            raise ScramError("channel binding is not supported by this server")
        if flag not in ("n", "y") or authzid != "":
            raise ScramError("malformed SCRAM message: bad gs2 header")
        attrs = self._attrs(bare)
        if len(attrs) < 2 or attrs[0][0] != "n" or attrs[1][0] != "r" or not attrs[1][1]:
            raise ScramError("malformed SCRAM message: expected n= and r=")
        cnonce = attrs[1][1]
        if any(not (0x21 <= ord(ch) <= 0x7E) or ch == "," for ch in cnonce):
            raise ScramError("malformed SCRAM message: bad nonce")
        self._gs2 = flag + ",,"
        self._client_first_bare = bare
        self._nonce = cnonce + base64.b64encode(os.urandom(18)).decode()
        self._server_first = f"r={self._nonce},s={base64.b64encode(self._v.salt).decode()},i={self._v.iterations}"
        return self._server_first.encode()

    def client_final(self, data: bytes) -> bytes:
        if not self._server_first:
            raise ScramError("SCRAM exchange out of order")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ScramError("malformed SCRAM message: not UTF-8") from None
        head, sep, proof_attr = text.rpartition(",p=")
        if not sep:
            raise ScramError("malformed SCRAM message: no proof")
        attrs = dict(self._attrs(head))
        expected_cb = base64.b64encode(self._gs2.encode()).decode()
        if attrs.get("c") != expected_cb:
            raise ScramError("SCRAM channel binding check failed")
        if attrs.get("r") != self._nonce:
            raise ScramError("SCRAM nonce mismatch")
        try:
            proof = base64.b64decode(proof_attr, validate=True)
        except ValueError:
            raise ScramError("malformed SCRAM message: bad proof") from None
        auth_message = f"{self._client_first_bare},{self._server_first},{head}".encode()
        signature = hmac.new(self._v.stored_key, auth_message, hashlib.sha256).digest()
        if len(proof) != len(signature):
            raise ScramError("password authentication failed")
        client_key = bytes(a ^ b for a, b in zip(proof, signature))
        ok = hmac.compare_digest(hashlib.sha256(client_key).digest(), self._v.stored_key)
        if not ok or self._always_fail:
            raise ScramError("password authentication failed")
        server_sig = hmac.new(self._v.server_key, auth_message, hashlib.sha256).digest()
        return ("v=" + base64.b64encode(server_sig).decode()).encode()


class ScramClientExchange:
    """Client side of SCRAM-SHA-256 toward PostgreSQL."""

    def __init__(self, user: str, password: str):
        self._client = scramp.ScramClient([MECHANISM], user, password)

    def client_first(self) -> bytes:
        return self._client.get_client_first().encode()

    def server_first(self, data: bytes) -> bytes:
        try:
            self._client.set_server_first(data.decode("utf-8"))
            return self._client.get_client_final().encode()
        except (scramp.ScramException, UnicodeDecodeError) as e:
            raise ScramError(str(e)) from None

    def server_final(self, data: bytes) -> None:
        try:
            self._client.set_server_final(data.decode("utf-8"))
        except (scramp.ScramException, UnicodeDecodeError) as e:
            raise ScramError(f"the server's SCRAM signature is invalid: {e}") from None


def md5_password(user: str, password: str, salt: bytes) -> str:
    """PostgreSQL's md5 answer: 'md5' + md5(md5(password + user) + salt)."""
    inner = hashlib.md5((password + user).encode()).hexdigest()
    return "md5" + hashlib.md5(inner.encode() + salt).hexdigest()
