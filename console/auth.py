"""Who is asking: API tokens (hashed in Mongo `console_tokens`), signed session cookies,
roles, and the signed confirmations of bulk actions.

A token is shown once, when it is created (`sendscript token add`); Mongo keeps only
its SHA-256 (tokens are 256 random bits: a salted slow hash buys nothing). A session
cookie is `<token hash>.<expiry>.<HMAC>`: it dies with its token (checked on every
request) and at its expiry. Cookies and confirmations are signed with the console's
secret: SENDSCRIPT_CONSOLE_SECRET, else one kept in Mongo so every console agrees.

A bulk action's confirmation also names a nonce kept in Mongo `console_confirmations`
until its expiry: the action spends it with one compare-and-set, so it runs once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from sendscript.models import utcnow

TOKENS = "console_tokens"
SECRETS = "console_secrets"
CONFIRMATIONS = "console_confirmations"
Role = Literal["viewer", "operator"]
ROLES: tuple[str, ...] = ("viewer", "operator")
TOKEN_PREFIX = "ssc_"
LOCAL = "local"  # the principal of an open console (loopback, no token exists yet)


@dataclass(frozen=True)
class Principal:
    name: str
    role: str

    @property
    def can_act(self) -> bool:
        return self.role == "operator"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


# -- the token store ---------------------------------------------------------------------


def ensure_indexes(db: Database) -> None:
    db[TOKENS].create_index("name", unique=True)
    db[CONFIRMATIONS].create_index("expires_at", expireAfterSeconds=0)


def add_token(db: Database, name: str, role: str) -> str:
    """Create a token; its text (shown once). ValueError on a bad role or a taken name."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if not name or len(name) > 100 or not name.replace("-", "").replace("_", "").replace(
            ".", "").replace("@", "").isalnum():
        raise ValueError("name: 1-100 letters, digits, - _ . @")
    ensure_indexes(db)
    token = new_token()
    try:
        db[TOKENS].insert_one({"_id": hash_token(token), "name": name, "role": role,
                               "created_at": utcnow()})
    except DuplicateKeyError:
        raise ValueError(f"a token named {name!r} exists") from None
    return token


def list_tokens(db: Database) -> list[dict[str, Any]]:
    return [{"name": d["name"], "role": d["role"], "created_at": d.get("created_at"),
             "last_used_at": d.get("last_used_at")}
            for d in db[TOKENS].find({}, {"_id": 0}).sort("name", 1)]


def remove_token(db: Database, name: str) -> bool:
    return db[TOKENS].delete_one({"name": name}).deleted_count == 1


def operator_count(db: Database) -> int:
    return db[TOKENS].count_documents({"role": "operator"})


def token_count(db: Database) -> int:
    return db[TOKENS].estimated_document_count()


def lookup(db: Database, token_hash: str) -> Principal | None:
    doc = db[TOKENS].find_one({"_id": token_hash}, {"name": 1, "role": 1})
    if doc is None or doc.get("role") not in ROLES:
        return None
    return Principal(str(doc["name"]), str(doc["role"]))


def console_secret(db: Database, configured: str | None) -> bytes:
    """The signing secret: the configured one, else the one every console shares."""
    if configured:
        return configured.encode()
    db[SECRETS].update_one({"_id": "cookie"},
                           {"$setOnInsert": {"value": secrets.token_hex(32),
                                             "created_at": utcnow()}}, upsert=True)
    doc = db[SECRETS].find_one({"_id": "cookie"})
    assert doc is not None
    return str(doc["value"]).encode()


# -- signing (pure) ------------------------------------------------------------------------


def _sign(secret: bytes, text: str) -> str:
    mac = hmac.new(secret, text.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).decode().rstrip("=")


def make_cookie(secret: bytes, token_hash: str, ttl_s: float, now: float | None = None) -> str:
    expiry = int((time.time() if now is None else now) + ttl_s)
    body = f"{token_hash}.{expiry}"
    return f"{body}.{_sign(secret, 'cookie:' + body)}"


def read_cookie(secret: bytes, value: str, now: float | None = None) -> str | None:
    """The token hash of a valid, unexpired cookie; None otherwise."""
    parts = value.split(".")
    if len(parts) != 3 or len(value) > 300:
        return None
    token_hash, expiry, mac = parts
    if not hmac.compare_digest(mac, _sign(secret, f"cookie:{token_hash}.{expiry}")):
        return None
    if not expiry.isdigit() or int(expiry) < (time.time() if now is None else now):
        return None
    return token_hash


@dataclass(frozen=True)
class Confirmation:
    """What a valid confirmation was given for: the count shown, and its nonce."""

    count: int
    nonce: str


def make_confirmation(secret: bytes, action: str, digest: str, count: int, who: str,
                      ttl_s: float, nonce: str, now: float | None = None) -> str:
    """A bulk action's confirmation: bound to the action, the filter's digest, the count
    shown, the person and a single-use nonce, valid ttl_s."""
    expiry = int((time.time() if now is None else now) + ttl_s)
    body = f"{action}.{digest}.{count}.{expiry}.{nonce}"
    return f"{body}.{_sign(secret, f'confirm:{who}:{body}')}"


def check_confirmation(secret: bytes, token: str, action: str, digest: str, who: str,
                       now: float | None = None) -> Confirmation:
    """What the confirmation was given for; ValueError saying why it is refused. Whether
    its nonce was spent already is the store's to say (`spend_confirmation`)."""
    parts = token.split(".")
    if len(parts) != 6 or len(token) > 400:
        raise ValueError("malformed confirmation")
    t_action, t_digest, count, expiry, nonce, mac = parts
    body = ".".join(parts[:5])
    if not hmac.compare_digest(mac, _sign(secret, f"confirm:{who}:{body}")):
        raise ValueError("confirmation not valid")
    if t_action != action or t_digest != digest:
        raise ValueError("confirmation was given for another action or filter")
    if not expiry.isdigit() or int(expiry) < (time.time() if now is None else now):
        raise ValueError("confirmation expired: preview again")
    if not count.isdigit():
        raise ValueError("malformed confirmation")
    return Confirmation(int(count), nonce)


def new_nonce() -> str:
    return secrets.token_hex(16)


def keep_confirmation(db: Database, nonce: str, who: str, ttl_s: float) -> None:
    """Record an issued confirmation, unspent, until it expires (Mongo's TTL removes it)."""
    db[CONFIRMATIONS].insert_one({"_id": nonce, "who": who, "used_at": None,
                                  "expires_at": utcnow() + timedelta(seconds=ttl_s)})


def spend_confirmation(db: Database, nonce: str, who: str) -> bool:
    """Spend it: True once, for the first caller; False if spent or never issued."""
    return db[CONFIRMATIONS].update_one(
        {"_id": nonce, "who": who, "used_at": None},
        {"$set": {"used_at": utcnow()}}).modified_count == 1
