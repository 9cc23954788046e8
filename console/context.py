"""The console's per-process state and the request dependencies: who asks, may they act."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, HTTPException, Request

from console import auth
from console.actions import Actions
from console.data import Stores
from console.live import Sampler
from sendscript.serving import exposed
from sendscript.settings import Settings

COOKIE = "sendscript_console"


class LoginRequired(Exception):
    """No valid credentials: pages redirect to /login, the API answers 401."""


@dataclass
class Console:
    settings: Settings
    stores: Stores
    actions: Actions
    sampler: Sampler
    secret: bytes
    _open_checked: float = 0.0
    _open: bool = False
    _seen: dict[str, tuple[float, auth.Principal | None]] = field(default_factory=dict)

    @property
    def may_open(self) -> bool:
        """Open mode is asked for (SENDSCRIPT_CONSOLE_OPEN: `sendscript demo`) and
        possible: loopback, no proxy in front."""
        s = self.settings
        return s.console_open and not exposed(s.console_host, s.trusted_proxies)

    def open_mode(self) -> bool:
        """Asked for, on loopback and with no token at all, the console is open (the
        demo's); the first token created closes it within 2 s."""
        if not self.may_open:
            return False
        now = time.monotonic()
        if now - self._open_checked > 2.0:
            self._open = auth.token_count(self.stores.db) == 0
            self._open_checked = now
        return self._open

    def principal_of(self, token_hash: str) -> auth.Principal | None:
        """The token's holder; cached a second (a removed token stops working within it)."""
        now = time.monotonic()
        hit = self._seen.get(token_hash)
        if hit and now - hit[0] < 1.0:
            return hit[1]
        who = auth.lookup(self.stores.db, token_hash)
        if len(self._seen) > 1000:
            self._seen.clear()
        self._seen[token_hash] = (now, who)
        return who


def console_of(request: Request) -> Console:
    return request.app.state.console


def principal(request: Request) -> auth.Principal:
    c = console_of(request)
    header = request.headers.get("authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip() or len(token) > 200:
            raise HTTPException(401, "Authorization: Bearer <token> expected")
        who = c.principal_of(auth.hash_token(token.strip()))
        if who is None:
            raise HTTPException(401, "unknown token")
        return who
    cookie = request.cookies.get(COOKIE)
    if cookie:
        token_hash = auth.read_cookie(c.secret, cookie)
        who = c.principal_of(token_hash) if token_hash else None
        if who is not None:
            return who
    if c.open_mode():
        return auth.Principal(auth.LOCAL, "operator")
    raise LoginRequired()


def operator(who: Annotated[auth.Principal, Depends(principal)]) -> auth.Principal:
    if not who.can_act:
        raise HTTPException(403, f"{who.name} is a viewer: viewers cannot act")
    return who


def same_origin(request: Request) -> bool:
    """A state-changing request from a page of another site is refused (CSRF): browsers
    name the page's origin on every cross-site POST."""
    origin = request.headers.get("origin")
    if not origin or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == request.headers.get("host", "")


Who = Annotated[auth.Principal, Depends(principal)]
Operator = Annotated[auth.Principal, Depends(operator)]
