"""The HTTP roles' server (console, agents): uvicorn that exits 0 when asked to stop,
answers only the Host names it is meant for, and believes forwarded headers only from
the proxies it is told to trust."""

from __future__ import annotations

from typing import Any

import uvicorn
from fastapi import FastAPI
from starlette.middleware.trustedhost import TrustedHostMiddleware

LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
WILDCARD = frozenset({"0.0.0.0", "::", ""})


class GracefulServer(uvicorn.Server):
    """uvicorn raises SIGTERM / SIGINT again after its graceful shutdown, which
    supervisord reports as a death; a stop asked for ends with exit code 0 instead."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()


def _bracketed(host: str) -> str:
    """IPv6 literals as a Host header carries them: `[::1]`."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def allowed_hosts(bind: str, configured: tuple[str, ...], setting: str) -> list[str]:
    """The Host names a role answers: the configured ones, else its bind address and
    localhost (every loopback name when it binds one). A wildcard bind has no name of
    its own, so it needs them configured; ValueError says which setting."""
    if configured:
        return [_bracketed(h.lower()) for h in configured]
    if bind in WILDCARD:
        raise ValueError(f"listening on {bind or 'every address'}: set SENDSCRIPT_{setting} "
                         "to the names clients reach it by (comma-separated; * for any)")
    names = {bind.lower(), "localhost"} | (set(LOOPBACK) if bind in LOOPBACK else set())
    return sorted(_bracketed(h) for h in names)


def host_refused() -> dict[int | str, dict[str, Any]]:
    """What /openapi.json says of that refusal (Starlette's plain-text answer), for every
    route; a new dict each time, as FastAPI adds to the one a route is given."""
    return {400: {"description": "The Host header names no host of the allow-list",
                  "content": {"text/plain": {"schema": {"type": "string"}}}}}


def guard_hosts(app: FastAPI, hosts: list[str]) -> None:
    """Refuse (400) a request whose Host is not one of `hosts`, before anything else of
    the app runs: a page whose name was rebound to our address sends its own name.
    Added last, so it is the outermost of the app's middleware."""
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts, www_redirect=False)


def proxy_options(trusted: tuple[str, ...]) -> dict[str, Any]:
    """uvicorn's forwarded-header handling: on for the trusted proxies only (uvicorn
    would otherwise believe any local process's X-Forwarded-Proto / -For)."""
    if not trusted:
        return {"proxy_headers": False}
    return {"proxy_headers": True, "forwarded_allow_ips": list(trusted)}


def exposed(bind: str, trusted: tuple[str, ...]) -> bool:
    """Reachable by others than this host's users: bound off loopback, or behind a
    proxy (whose requests all come from loopback when it runs on this host)."""
    return bind not in LOOPBACK or bool(trusted)
