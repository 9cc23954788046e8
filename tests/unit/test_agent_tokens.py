"""An agent's token goes on a command line (`--token ...`): it never starts with "-"."""

from __future__ import annotations

from sendscript.agent_store import hash_secret, new_secret, token_doc


def test_a_token_never_reads_as_an_option() -> None:
    # One token_urlsafe in 64 starts with "-": 3,000 draws meet many of them.
    secrets = [new_secret() for _ in range(3000)]
    assert not [s for s in secrets if s.startswith("-")]
    assert len(set(secrets)) == len(secrets)
    assert all(len(s) == 32 for s in secrets)


def test_the_stored_document_holds_the_tokens_hash_only() -> None:
    secret, doc = token_doc("rack-1", ["phone-"], [])
    assert not secret.startswith("-") and doc["_id"] == hash_secret(secret)
    assert secret not in str(doc)
