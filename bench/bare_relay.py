"""The bare relay: the measured limit of an asyncio/uvloop proxy on this machine.

Not product code: a benchmark target (``make bench``) that does the per-message work every
PostgreSQL proxy in Python must do, and nothing else, so tenantgate's figures can be read as
"how far from what this architecture allows":

* client framing: every client message is cut out of the byte stream (type, length);
* every simple Query is looked up in a dict keyed on its raw bytes (the exact-text cache a
  rewriting proxy needs); a miss normalises the numeric literals in one regex pass and stores
  the result;
* the backend's bytes are scanned for message boundaries and ReadyForQuery, and forwarded
  in bulk (one write per read);
* transaction pooling's release and attach: at a ReadyForQuery with status ``I`` the backend
  connection is given back, the client's next message borrows it again.  As in the issue's
  measurement each client has one backend connection of its own, so borrowing never waits;
* no policy, no metrics, no SQL.

Authentication is passed through: the startup packet goes to PostgreSQL as it is, and the
authentication exchange (SCRAM, md5, trust: whatever the cluster asks) is relayed between
client and server.  SSLRequest and GSSENCRequest are answered ``N``.

Run: ``python -m bench.bare_relay --port 6500 --backend-port 5432`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import struct

_unpack_i32 = struct.Struct("!I").unpack_from
_SSL_REQUEST = 80877103
_GSS_REQUEST = 80877104
_CANCEL_REQUEST = 80877102
_RFQ = 90  # 'Z'
_QUERY = 81  # 'Q'
_TERMINATE = 88  # 'X'
_NUMBER = re.compile(rb"(?<![\w$.])\d+(?:\.\d+)?(?![\w$])")
_CACHE_MAX = 10_000


class Backend(asyncio.Protocol):
    """One connection to PostgreSQL: scans for ReadyForQuery, forwards every read in one write."""

    __slots__ = ("client", "transport", "skip", "partial")

    def __init__(self, client: "Client"):
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.skip = 0  # bytes of the current message still to come
        self.partial = b""  # an incomplete message header

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        client = self.client
        ready = None
        if self.partial:
            data = self.partial + data
            self.partial = b""
            scan, pos = data, 0
        else:
            scan, pos = data, self.skip
            self.skip = 0
        n = len(scan)
        while pos < n:
            if n - pos < 5:
                # keep the incomplete header for the next read, forward only whole headers
                self.partial = scan[pos:]
                data = scan[:pos]
                break
            t = scan[pos]
            end = pos + 1 + _unpack_i32(scan, pos + 1)[0]
            if t == _RFQ and end <= n:
                ready = scan[pos + 5]
            pos = end
        else:
            self.skip = pos - n
        if data:
            client.transport.write(data)
        if ready == 73:  # 'I': nothing open, the connection goes back to the pool
            client.release()

    def connection_lost(self, exc) -> None:
        self.client.backend_lost()

    def pause_writing(self) -> None:
        self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        self.client.transport.resume_reading()


class Client(asyncio.Protocol):
    """One client: startup, then framed messages to its backend connection."""

    __slots__ = ("relay", "transport", "buf", "backend", "attached", "started", "pending", "xacts")

    def __init__(self, relay: "BareRelay"):
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.backend: Backend | None = None
        self.attached = False
        self.started = False
        self.pending: list[bytes] = []  # messages sent before the backend connection is open
        self.xacts = 0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        if buf:
            buf += data
            data = bytes(buf)
            buf.clear()
        if not self.started:
            data = self._startup(data)
            if data is None:
                return
        n = len(data)
        pos = 0
        cache = self.relay.cache
        while n - pos >= 5:
            end = pos + 1 + _unpack_i32(data, pos + 1)[0]
            if end > n:
                break
            t = data[pos]
            if t == _QUERY:
                payload = data[pos + 5:end]
                hit = cache.get(payload)
                if hit is None:
                    if len(cache) >= _CACHE_MAX:
                        cache.clear()
                    hit = cache[payload] = _NUMBER.sub(b"$n", payload)
            elif t == _TERMINATE:
                if pos:
                    self._send(data[:pos])
                self.transport.close()
                return
            pos = end
        if pos < n:
            buf += data[pos:]
        if pos:
            if not self.attached:
                self.attached = True  # borrow: one backend connection per client, never waits
            self._send(data if pos == n else data[:pos])

    def _send(self, data: bytes) -> None:
        b = self.backend
        if b is not None and b.transport is not None:
            b.transport.write(data)
        else:
            self.pending.append(data)

    def _startup(self, data: bytes) -> bytes | None:
        """Answer SSL/GSS requests; on the startup packet, open the backend connection."""
        while True:
            if len(data) < 8:
                self.buf += data
                return None
            length = _unpack_i32(data, 0)[0]
            if len(data) < length:
                self.buf += data
                return None
            code = _unpack_i32(data, 4)[0]
            packet, data = data[:length], data[length:]
            if code in (_SSL_REQUEST, _GSS_REQUEST):
                self.transport.write(b"N")
                continue
            if code == _CANCEL_REQUEST:
                asyncio.get_running_loop().create_task(self.relay.forward_cancel(packet))
                self.transport.close()
                return None
            self.started = True
            self.pending.append(packet)
            asyncio.get_running_loop().create_task(self._connect())
            return data

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, backend = await loop.create_connection(lambda: Backend(self), self.relay.host, self.relay.port)
        except OSError:
            self.transport.close()
            return
        self.backend = backend
        if self.transport.is_closing():
            backend.transport.close()
            return
        backend.transport.write(b"".join(self.pending))
        self.pending = []

    def release(self) -> None:
        if self.attached:
            self.attached = False
            self.xacts += 1

    def backend_lost(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc) -> None:
        b = self.backend
        if b is not None and b.transport is not None and not b.transport.is_closing():
            b.transport.write(b"X\x00\x00\x00\x04")
            b.transport.close()

    def pause_writing(self) -> None:
        b = self.backend
        if b is not None and b.transport is not None:
            b.transport.pause_reading()

    def resume_writing(self) -> None:
        b = self.backend
        if b is not None and b.transport is not None:
            b.transport.resume_reading()


class BareRelay:
    def __init__(self, host: str, port: int):
        self.host = host
        self.port = port
        self.cache: dict[bytes, bytes] = {}

    async def forward_cancel(self, packet: bytes) -> None:
        try:
            _, w = await asyncio.open_connection(self.host, self.port)
            w.write(packet)
            await w.drain()
            w.close()
        except OSError:
            pass


async def serve(listen_host: str, listen_port: int, backend_host: str, backend_port: int) -> None:
    relay = BareRelay(backend_host, backend_port)
    server = await asyncio.get_running_loop().create_server(lambda: Client(relay), listen_host, listen_port,
                                                            backlog=4096)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bare_relay", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--backend-host", default="127.0.0.1")
    p.add_argument("--backend-port", type=int, required=True)
    a = p.parse_args(argv)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency of tenantgate
        asyncio.run(serve(a.host, a.port, a.backend_host, a.backend_port))
    else:
        uvloop.run(serve(a.host, a.port, a.backend_host, a.backend_port))


if __name__ == "__main__":
    main()
