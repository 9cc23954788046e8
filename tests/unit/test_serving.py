"""Which Host names the HTTP roles answer, and which proxies they believe (pure)."""

from __future__ import annotations

import pytest

from sendscript.serving import allowed_hosts, exposed, proxy_options
from sendscript.settings import Settings


def test_default_hosts_are_the_bind_address_and_localhost() -> None:
    assert allowed_hosts("127.0.0.1", (), "CONSOLE_HOSTS") == [
        "127.0.0.1", "[::1]", "localhost"]
    assert allowed_hosts("10.0.0.5", (), "CONSOLE_HOSTS") == ["10.0.0.5", "localhost"]
    assert allowed_hosts("::1", (), "AGENTS_HOSTS") == ["127.0.0.1", "[::1]", "localhost"]


def test_configured_hosts_replace_the_default_and_a_wildcard_bind_needs_them() -> None:
    assert allowed_hosts("0.0.0.0", ("Console.LAN", "fd00::7", "*"), "X") == [
        "console.lan", "[fd00::7]", "*"]
    with pytest.raises(ValueError, match="SENDSCRIPT_AGENTS_HOSTS"):
        allowed_hosts("0.0.0.0", (), "AGENTS_HOSTS")
    with pytest.raises(ValueError, match="SENDSCRIPT_CONSOLE_HOSTS"):
        allowed_hosts("::", (), "CONSOLE_HOSTS")


def test_forwarded_headers_only_from_configured_proxies() -> None:
    assert proxy_options(()) == {"proxy_headers": False}
    assert proxy_options(("10.0.0.0/8",)) == {"proxy_headers": True,
                                              "forwarded_allow_ips": ["10.0.0.0/8"]}
    assert not exposed("127.0.0.1", ())
    assert exposed("127.0.0.1", ("127.0.0.1",)) and exposed("0.0.0.0", ())


def test_settings_read_comma_separated_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SENDSCRIPT_CONSOLE_HOSTS", "a.lan, b.lan,")
    monkeypatch.setenv("SENDSCRIPT_TRUSTED_PROXIES", "10.1.2.3")
    s = Settings()
    assert s.console_hosts == ("a.lan", "b.lan") and s.trusted_proxies == ("10.1.2.3",)
    assert s.agents_hosts == () and s.console_open is False and s.metrics_token is None
    # to_env (what a role hands its children) reads back the same
    monkeypatch.setenv("SENDSCRIPT_CONSOLE_HOSTS", s.to_env()["SENDSCRIPT_CONSOLE_HOSTS"])
    assert Settings().console_hosts == ("a.lan", "b.lan")
