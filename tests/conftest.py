"""Fixtures: one set of real embedded servers per session; each test gets its own
key prefix, database and topic on them, and its roles as real processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sendscript.dev.embedded import EmbeddedServers
from sendscript.settings import Settings
from tests.support import Inspect, Roles, session_servers, unique_settings


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServers]:
    embedded = session_servers(tmp_path_factory.mktemp("servers"))
    embedded.start()
    yield embedded
    embedded.stop()


@pytest.fixture
def settings(servers: EmbeddedServers) -> Settings:
    return unique_settings(servers)


@pytest.fixture
def roles(settings: Settings, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Roles]:
    r = Roles(settings, tmp_path / "logs")
    yield r
    r.stop()
    report = request.node.stash.get(_failed_key, False)
    if report:
        print(r.logs())


@pytest.fixture
def inspect(settings: Settings) -> Iterator[Inspect]:
    view = Inspect(settings)
    yield view
    view.close()


_failed_key = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    if report.when == "call" and report.failed:
        item.stash[_failed_key] = True
    return report
