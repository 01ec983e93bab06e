"""Large statements are analysed off the event loop, within a time budget.

A cold rewrite costs time roughly proportional to the statement's length (sqlglot parses in
Python: about 7 us per byte of a ``SELECT 1,1,...``).  On the event loop a 500 KiB statement
would stall every other client of the process for seconds.  The session hands statements
longer than ``limits.statement_offload_bytes`` to :func:`analyse`, which runs the gate's check
in one worker thread per process while the session waits (only that session: it is blocked,
its later messages wait behind the statement, so ordering is kept).

* One worker thread: a second large statement queues behind the first; the event loop keeps
  the GIL often enough (the switch interval is lowered to 1 ms while a worker exists), so
  other clients' short statements keep their latency (docs/benchmarks.md).
* Budget: when the analysis has not finished within ``limits.statement_cpu_budget_s`` the
  statement is refused with 57014.  Python cannot stop a thread, so the analysis runs to its
  end in the background and its result is dropped; the statement-size limit
  (``limits.max_statement_bytes``, 54000) bounds how long that can be.
* Fail closed: an exception in the worker refuses the statement (XX000).

No sockets and no SQL here: the check is a callable given by the session.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import pickle
import signal
import sys
import warnings
from typing import Any, Callable

from proxy.seam import Refuse

log = logging.getLogger("tenantgate.offload")

_executor: concurrent.futures.ThreadPoolExecutor | None = None
SWITCH_INTERVAL_S = 0.001


def _worker() -> concurrent.futures.ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tenantgate-analyse")
        if sys.getswitchinterval() > SWITCH_INTERVAL_S:
            sys.setswitchinterval(SWITCH_INTERVAL_S)
    return _executor


def budget_refusal(budget_s: float) -> Refuse:
    return Refuse("57014", f"canceling statement: tenantgate could not analyse it within {budget_s:g} s",
                  hint="send a shorter statement, or raise limits.statement_cpu_budget_s in tenantgate's config",
                  reason="other")


async def analyse(check: Callable[[], Any], budget_s: float) -> Any:
    """Run ``check()`` in the worker thread; its result, or a Refuse (budget exceeded, crash)."""
    loop = asyncio.get_running_loop()
    fut = loop.run_in_executor(_worker(), check)
    try:
        return await asyncio.wait_for(asyncio.shield(fut), budget_s)
    except TimeoutError:
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # drop the late result quietly
        return budget_refusal(budget_s)
    except Exception:
        log.exception("statement analysis in the worker thread failed")
        return Refuse("XX000", "internal error in tenantgate while checking the statement")




class Computed:
    """What a forked analysis returned (see :func:`run_forked`)."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value


async def run_forked(compute: Callable[[], Any], budget_s: float) -> Computed | Refuse:
    """Run ``compute()`` in a forked child process and return its (pickled) result.

    A child has its own GIL and its own memory: sqlglot's compiled parser holds the GIL for the
    whole parse of a statement (about 1 s per 256 KiB), which no thread can avoid, and the parse
    tree (~10 KiB per KiB of statement) is freed when the child exits.  The child gets a
    snapshot of the process (copy on write) and only runs ``compute``; at the budget it is
    killed (a real CPU budget: 57014)."""
    loop = asyncio.get_running_loop()
    try:
        r, w = os.pipe()
    except OSError as e:
        log.error("could not start a statement analysis process: %s", e)
        return Refuse("53000", "tenantgate has no resources left to analyse this statement; try again later")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork of a threaded process: the child only computes
            pid = os.fork()
    except OSError as e:
        os.close(r)
        os.close(w)
        log.error("could not start a statement analysis process: %s", e)
        return Refuse("53000", "tenantgate has no resources left to analyse this statement; try again later")
    if pid == 0:  # the child: compute, write the result, leave without any cleanup
        code = 0
        try:
            os.close(r)
            try:
                out = pickle.dumps((True, compute()), protocol=pickle.HIGHEST_PROTOCOL)
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                out = pickle.dumps((False, f"{type(e).__name__}: {e}"))
            view = memoryview(out)
            while view:
                view = view[os.write(w, view):]
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    os.set_blocking(r, False)
    done: asyncio.Future = loop.create_future()
    chunks: list[bytes] = []

    def readable() -> None:
        try:
            data = os.read(r, 1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            chunks.append(data)
        elif not done.done():
            done.set_result(b"".join(chunks))

    loop.add_reader(r, readable)
    timed_out = False
    try:
        data = await asyncio.wait_for(done, budget_s)
    except TimeoutError:
        timed_out = True
        data = b""
    finally:
        loop.remove_reader(r)
        os.close(r)
        _reap(pid, kill=not done.done() or timed_out)
    if timed_out:
        return budget_refusal(budget_s)
    try:
        ok, value = pickle.loads(data) if data else (False, "the analysis process ended without a result")
    except Exception as e:
        ok, value = False, f"unreadable result: {e}"
    if not ok:
        log.error("statement analysis in a child process failed: %s", value)
        return Refuse("XX000", "internal error in tenantgate while checking the statement")
    return Computed(value)


def _reap(pid: int, kill: bool) -> None:
    try:
        if kill:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ChildProcessError, ProcessLookupError):
        pass  # reaped elsewhere (a child watcher)
