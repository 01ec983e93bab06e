"""A pooled connection given back while its last client had paused reading (the client's socket
was full when the transaction's last reply went out) must read again: the next client borrowing
it would otherwise never get its replies, and that client's resume_writing no longer reaches it."""

from __future__ import annotations

import asyncio
import socket

from proxy.backend_link import BackendProtocol


async def test_detach_resumes_reading_that_the_last_client_paused():
    a, b = socket.socketpair()
    loop = asyncio.get_running_loop()
    try:
        transport, proto = await loop.connect_accepted_socket(BackendProtocol, a)
        got: list[bytes] = []
        proto.start_relay(got.append)
        transport.pause_reading()  # ClientSession.pause_writing: the client is slow
        proto.detach()  # the connection goes back to the pool
        b.sendall(b"Z\x00\x00\x00\x05I")
        for _ in range(100):
            if proto.has_buffered_data():
                break
            await asyncio.sleep(0.01)
        assert transport.is_reading()
        assert proto.has_buffered_data() and got == []  # buffered for the next client, not the last one
        transport.close()
    finally:
        b.close()
