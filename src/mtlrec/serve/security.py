"""API keys, per-key rate limits, brute-force lockout, body limits and opaque 500s.

The checks that only need headers run in ASGI middleware, before the body is read or a route is
matched: an unauthenticated client learns nothing about routes and cannot make the server parse
a body. Order, outermost first: `ErrorIdMiddleware` -> CORS (when configured) -> `GuardMiddleware`
-> `BodyLimitMiddleware` -> routes. `require_api_key` (a dependency of every /v1 router) reads
the principal the guard stored and puts the bearer scheme into the OpenAPI schema.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mtlrec.serve.settings import ServeSettings

logger = logging.getLogger("mtlrec.serve")

PUBLIC_PATHS = frozenset({"/healthz"})
PRINCIPAL = "mtlrec_principal"
"""Key of `scope['state']` under which the guard leaves the authenticated principal."""


# ---------------------------------------------------------------------------------------------
# API keys


class ApiKeys:
    """SHA-256 digests of the accepted keys; a presented key is hashed and compared in constant time.

    Every stored digest is compared (no early exit), so the time taken does not tell which key,
    or how much of one, matched. Principals are 'key#<n>', never the key or its digest.
    """

    def __init__(self, digests: tuple[str, ...]) -> None:
        self._digests = [bytes.fromhex(d) for d in digests]

    def __len__(self) -> int:
        return len(self._digests)

    def identify(self, presented: str) -> str | None:
        """'key#<n>' of the matching key, or None."""
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found = None
        for i, stored in enumerate(self._digests, start=1):
            if hmac.compare_digest(digest, stored) and found is None:
                found = f"key#{i}"
        return found


def bearer_token(headers: dict[str, str]) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header, or None."""
    value = headers.get("authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


# ---------------------------------------------------------------------------------------------
# Rate limit and brute force


class TokenBucketLimiter:
    """One token bucket per principal: `burst` tokens, refilled at `rate` per second.

    Args:
        rate: tokens per second.
        burst: bucket capacity.
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 max_buckets: int = 100000) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self.max_buckets = max_buckets
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, principal: str) -> float:
        """Take one token: 0.0 when allowed, else the seconds until a token is available."""
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.pop(principal, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.rate
            self._buckets[principal] = (tokens, now)
            while len(self._buckets) > self.max_buckets:  # insecure mode keys buckets by address
                self._buckets.popitem(last=False)
            return wait


@dataclass
class _Failures:
    times: deque[float] = field(default_factory=deque)
    blocked_until: float = 0.0


class AuthFailureTracker:
    """Failed authentications per client address: slowed down after a few, blocked after more.

    Within `auth_failure_window_s`, the n-th failure (n > `auth_slowdown_after`) is answered after
    `auth_slowdown_base_s * 2 ** (n - auth_slowdown_after - 1)` seconds (at most
    `auth_slowdown_max_s`); at `auth_block_after` failures the address is blocked for
    `auth_block_s` seconds, every request from it answered 429 with Retry-After. At most
    `max_tracked_clients` addresses are remembered (least recently failed forgotten first).
    """

    def __init__(self, settings: ServeSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self._clients: OrderedDict[str, _Failures] = OrderedDict()
        self._lock = threading.Lock()

    def blocked_for(self, client: str) -> float:
        """Seconds this address stays blocked (0.0 when it is not blocked)."""
        with self._lock:
            entry = self._clients.get(client)
            if entry is None:
                return 0.0
            return max(0.0, entry.blocked_until - self.clock())

    def fail(self, client: str) -> tuple[float, float]:
        """Record a failure: (delay before answering, seconds blocked; 0.0 when not blocked)."""
        s = self.settings
        now = self.clock()
        with self._lock:
            entry = self._clients.pop(client, None) or _Failures()
            self._clients[client] = entry
            while len(self._clients) > s.max_tracked_clients:
                self._clients.popitem(last=False)
            while entry.times and entry.times[0] <= now - s.auth_failure_window_s:
                entry.times.popleft()
            entry.times.append(now)
            n = len(entry.times)
            if n >= s.auth_block_after:
                entry.blocked_until = now + s.auth_block_s
                entry.times.clear()
                return 0.0, s.auth_block_s
            if n <= s.auth_slowdown_after:
                return 0.0, 0.0
            return min(s.auth_slowdown_max_s, s.auth_slowdown_base_s * 2 ** (n - s.auth_slowdown_after - 1)), 0.0


# ---------------------------------------------------------------------------------------------
# ASGI middleware


async def send_json(send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    """Send a complete JSON response on a raw ASGI channel."""
    data = json.dumps(body).encode("utf-8")
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def client_address(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


class Guard:
    """The header-only checks of one request: lockout, API key, rate limit."""

    def __init__(self, settings: ServeSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.keys = ApiKeys(settings.api_key_hashes)
        self.limiter = TokenBucketLimiter(settings.rate_limit_per_second, settings.rate_limit_burst, clock)
        self.failures = AuthFailureTracker(settings, clock)


class GuardMiddleware:
    """Authenticates and rate-limits every HTTP request except `PUBLIC_PATHS`."""

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        guard = self.guard
        client = client_address(scope)
        blocked = guard.failures.blocked_for(client)
        if blocked > 0:
            await send_json(send, 429, {"error": "blocked", "detail": "too many failed authentications from this "
                                        "address; retry later"}, _retry_after(blocked))
            return
        if guard.settings.insecure_no_auth:
            principal = f"address:{client}"
        else:
            token = bearer_token(_headers(scope))
            if token is None:
                await send_json(send, 401, {"error": "unauthorized", "detail": "missing API key: send the header "
                                            "'Authorization: Bearer <key>'"}, {"WWW-Authenticate": "Bearer"})
                return
            found = guard.keys.identify(token)
            if found is None:
                delay, blocked = guard.failures.fail(client)
                logger.warning("failed authentication from %s on %s %s", client, scope.get("method"),
                               scope.get("path"))
                if blocked > 0:
                    logger.warning("blocking %s for %.0f s after repeated failed authentications", client, blocked)
                    await send_json(send, 429, {"error": "blocked", "detail": "too many failed authentications from "
                                                "this address; retry later"}, _retry_after(blocked))
                    return
                if delay > 0:
                    await asyncio.sleep(delay)
                await send_json(send, 401, {"error": "unauthorized", "detail": "invalid API key"},
                                {"WWW-Authenticate": 'Bearer error="invalid_token"'})
                return
            principal = found
        wait = guard.limiter.take(principal)
        if wait > 0:
            await send_json(send, 429, {"error": "rate_limited", "detail": "rate limit exceeded for this API key"},
                            _retry_after(wait))
            return
        scope.setdefault("state", {})[PRINCIPAL] = principal
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for a request body over `max_bytes`: by Content-Length when sent, else while reading.

    The body is read (up to the limit) before the route runs and replayed to it, so a chunked
    body without Content-Length is held to the same limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = {"error": "payload_too_large", "detail": f"request body exceeds {self.max_bytes} bytes"}
        length = _headers(scope).get("content-length")
        if length is not None:
            if not length.isdigit():
                await send_json(send, 400, {"error": "bad_request", "detail": "invalid Content-Length"})
                return
            if int(length) > self.max_bytes:
                await send_json(send, 413, too_large, {"Connection": "close"})
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await send_json(send, 413, too_large, {"Connection": "close"})
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class ErrorIdMiddleware:
    """Any unhandled exception becomes `500 {"error": "internal", "id": "<uuid>"}`; the log holds
    the traceback under the same id. No exception text or path reaches the client."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            error_id = str(uuid.uuid4())
            logger.exception("internal error id=%s on %s %s", error_id, scope.get("method"), scope.get("path"))
            if not started:
                await send_json(send, 500, {"error": "internal", "id": error_id})


# ---------------------------------------------------------------------------------------------
# Dependency

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`.")


def require_api_key(request: Request,
                    credentials: HTTPAuthorizationCredentials | None = Security(_bearer)) -> str:
    """The principal the guard authenticated ('key#<n>', or 'address:<ip>' without auth)."""
    principal = request.scope.get("state", {}).get(PRINCIPAL)
    if principal is None:  # the guard did not run: never serve unauthenticated by accident
        raise HTTPException(401, "missing API key", headers={"WWW-Authenticate": "Bearer"})
    return str(principal)
