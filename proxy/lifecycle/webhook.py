"""Signed webhook delivery: one HTTP POST with a JSON body, retried with exponential backoff.

The body is signed with HMAC-SHA256 under the deployment's secret
(``lifecycle.notices.webhook_secret``); the receiver recomputes it over the raw
body it received and compares in constant time::

    X-Tenantgate-Signature: sha256=<hex of HMAC-SHA256(secret, body)>
    X-Tenantgate-Notice-Id: <tenant>/<retention end>/<kind>   (the same on every retry: deduplicate on it)

The body carries ``sent_at``, so a receiver can also refuse old replays.

Retries: a network error, a timeout, 408, 429 and any 5xx are retried (up to
``attempts``; the waits are ``backoff_initial_s``, then doubled, capped at
``backoff_max_s``); any other status is final (2xx delivered, else failed).
Standard library only; blocking (the CLI runs it in a thread).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable

SIGNATURE_HEADER = "X-Tenantgate-Signature"
NOTICE_ID_HEADER = "X-Tenantgate-Notice-Id"
RETRY_STATUSES = frozenset({408, 429})


def signature(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_signature(body: bytes, secret: str, header: str | None) -> bool:
    """What a receiver does (used by the tests, and documented for tenants)."""
    return header is not None and hmac.compare_digest(signature(body, secret), header)


@dataclass
class Delivery:
    delivered: bool
    attempts: int
    status: int | None = None  # the last HTTP status, None without a response
    error: str | None = None  # why the last try failed
    retryable: bool = False  # the last failure may succeed later


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *a, **k):  # a redirect would re-send the body elsewhere: not followed
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def post_once(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> tuple[int | None, str | None]:
    """(HTTP status, error text) of one POST."""
    req = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with _opener.open(req, timeout=timeout_s) as resp:
            resp.read(1 << 16)
            return resp.status, None
    except urllib.error.HTTPError as e:
        return e.code, f"HTTP {e.code}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return None, f"{type(e).__name__}: {reason}"[:300]


def deliver(url: str, doc: dict, secret: str, *, notice_id: str, attempts: int = 4, timeout_s: float = 10.0,
            backoff_initial_s: float = 1.0, backoff_max_s: float = 60.0,
            sleep: Callable[[float], None] = time.sleep) -> Delivery:
    """POST ``doc`` as signed JSON to ``url``, retrying what may succeed later."""
    if not secret:
        raise ValueError("a webhook secret is required: unsigned notices are never sent")
    body = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "tenantgate-notices",
               SIGNATURE_HEADER: signature(body, secret), NOTICE_ID_HEADER: notice_id}
    wait = backoff_initial_s
    status = error = None
    for n in range(1, attempts + 1):
        status, error = post_once(url, body, headers, timeout_s)
        if status is not None and 200 <= status < 300:
            return Delivery(True, n, status)
        retryable = status is None or status in RETRY_STATUSES or status >= 500
        if not retryable:
            return Delivery(False, n, status, error, retryable=False)
        if n < attempts:
            sleep(min(wait, backoff_max_s))
            wait *= 2
    return Delivery(False, attempts, status, error, retryable=True)
