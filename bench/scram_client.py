"""A light asyncio PostgreSQL client for opening thousands of idle connections.

Only what the idle-connection benchmark needs: startup, SCRAM-SHA-256
authentication, waiting for ReadyForQuery, a simple ``Query`` round trip and
Terminate.  One :class:`IdleClient` is a socket plus a few bytes of state, far
lighter than an asyncpg connection, so the bench process can hold 10,000.

PBKDF2 is the expensive part of SCRAM; :class:`SaltedPasswords` computes it once
per (password, salt, iterations) and reuses it, so 10,000 logins against one
stored verifier cost one PBKDF2.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import struct

from proxy.wire import messages as m

PROTOCOL_3 = 196608


class LoginError(Exception):
    pass


class SaltedPasswords:
    """Cache of SCRAM SaltedPassword values (PBKDF2-HMAC-SHA-256)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, bytes, int], bytes] = {}

    def get(self, password: str, salt: bytes, iterations: int) -> bytes:
        key = (password, salt, iterations)
        v = self._cache.get(key)
        if v is None:
            v = self._cache[key] = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
        return v


def _error_text(payload: bytes) -> str:
    fields = {}
    for part in payload.split(b"\0"):
        if part:
            fields[part[:1]] = part[1:].decode(errors="replace")
    return f"{fields.get(b'C', '?????')}: {fields.get(b'M', '')}"


class IdleClient:
    """One authenticated connection that then sits idle."""

    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    async def _read(self) -> tuple[bytes, bytes]:
        head = await self.reader.readexactly(5)
        mtype, length = head[:1], struct.unpack("!I", head[1:])[0]
        payload = await self.reader.readexactly(length - 4) if length > 4 else b""
        if mtype == b"E":
            raise LoginError(_error_text(payload))
        return mtype, payload

    async def _until_ready(self) -> bytes:
        while True:
            mtype, payload = await self._read()
            if mtype == b"Z":
                return payload

    @classmethod
    async def connect(cls, host: str, port: int, user: str, password: str, database: str,
                      salted: SaltedPasswords) -> "IdleClient":
        reader, writer = await asyncio.open_connection(host, port)
        client = cls(reader, writer)
        try:
            await client._login(user, password, database, salted)
        except BaseException:
            writer.close()
            raise
        return client

    async def _login(self, user: str, password: str, database: str, salted: SaltedPasswords) -> None:
        body = struct.pack("!i", PROTOCOL_3) + m.cstr("user") + m.cstr(user) + m.cstr("database") + m.cstr(database) + b"\0"
        self.writer.write(struct.pack("!i", len(body) + 4) + body)
        mtype, payload = await self._read()
        code, data = m.decode_auth(payload)
        if mtype != b"R" or code != m.AUTH_SASL or b"SCRAM-SHA-256\0" not in data:
            raise LoginError(f"expected a SCRAM-SHA-256 request, got {mtype!r} code {code}")
        client_nonce = base64.b64encode(os.urandom(18)).decode()
        client_first_bare = f"n=,r={client_nonce}"
        self.writer.write(m.encode_sasl_initial("SCRAM-SHA-256", ("n,," + client_first_bare).encode()))
        mtype, payload = await self._read()
        code, server_first_b = m.decode_auth(payload)
        if code != m.AUTH_SASL_CONTINUE:
            raise LoginError(f"expected SASL continue, got code {code}")
        server_first = server_first_b.decode()
        attrs = dict(part.split("=", 1) for part in server_first.split(","))
        nonce, salt, iterations = attrs["r"], base64.b64decode(attrs["s"]), int(attrs["i"])
        if not nonce.startswith(client_nonce):
            raise LoginError("server nonce does not extend the client nonce")
        salted_password = salted.get(password, salt, iterations)
        final_without_proof = f"c=biws,r={nonce}"
        auth_message = f"{client_first_bare},{server_first},{final_without_proof}".encode()
        client_key = hmac.new(salted_password, b"Client Key", hashlib.sha256).digest()
        stored_key = hashlib.sha256(client_key).digest()
        signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        self.writer.write(m.encode_sasl_response(f"{final_without_proof},p={base64.b64encode(proof).decode()}".encode()))
        mtype, payload = await self._read()
        code, server_final = m.decode_auth(payload)
        if code != m.AUTH_SASL_FINAL:
            raise LoginError(f"expected SASL final, got code {code}")
        server_key = hmac.new(salted_password, b"Server Key", hashlib.sha256).digest()
        expected = base64.b64encode(hmac.new(server_key, auth_message, hashlib.sha256).digest()).decode()
        if server_final.decode() != f"v={expected}":
            raise LoginError("the server's SCRAM signature is wrong")
        mtype, payload = await self._read()
        if m.decode_auth(payload)[0] != m.AUTH_OK:
            raise LoginError("expected AuthenticationOk")
        await self._until_ready()

    async def query(self, sql: str) -> list[bytes]:
        """Run one simple query; returns the raw DataRow payloads."""
        self.writer.write(m.encode_query(sql))
        rows = []
        while True:
            mtype, payload = await self._read()
            if mtype == b"D":
                rows.append(payload)
            elif mtype == b"Z":
                return rows

    def close(self) -> None:
        try:
            self.writer.write(m.TERMINATE)
        except Exception:
            pass
        self.writer.close()


async def open_many(n: int, *, host: str, port: int, user: str, password: str, database: str,
                    concurrency: int = 200, timeout: float = 30.0) -> list[IdleClient]:
    """Open ``n`` authenticated clients, at most ``concurrency`` logins at a time
    (each login must finish within ``timeout`` seconds)."""
    salted = SaltedPasswords()
    sem = asyncio.Semaphore(concurrency)

    async def one() -> IdleClient:
        async with sem:
            for attempt in range(3):
                try:
                    return await asyncio.wait_for(
                        IdleClient.connect(host, port, user, password, database, salted), timeout)
                except (ConnectionError, OSError, asyncio.TimeoutError):
                    if attempt == 2:
                        raise
                    await asyncio.sleep(0.2)
            raise AssertionError("unreachable")

    results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    clients = [r for r in results if isinstance(r, IdleClient)]
    errors = [r for r in results if not isinstance(r, IdleClient)]
    if errors:
        for c in clients:
            c.close()
        raise LoginError(f"{len(errors)} of {n} logins failed; first: {errors[0]!r}")
    return clients
