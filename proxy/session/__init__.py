"""One client session: a sans-IO relay core and the asyncio I/O around it.

- ``relay.py`` / ``replies.py``: the protocol core (client messages in, backend bytes in; bytes
  out and events), no asyncio;
- ``statements.py``, ``settings.py``, ``copy_in.py``, ``ledger.py``, ``copy_digest.py``,
  ``counters.py``: pure parts of the core's state;
- ``protocol.py``: the asyncio Protocol (callbacks, tasks, timers, close);
- ``startup.py``: SSL/GSS/Cancel, SCRAM, the gate, the backend connection;
- ``pooled.py``: transaction pooling's borrow, sync and release.
"""
