"""What the property-based API tests share: one schemathesis configuration, fixed so a
run is the same on every machine and bounded in time."""

from __future__ import annotations

import pytest
import schemathesis

SEED = 20_240_601
MAX_EXAMPLES = 8  # per operation and generation phase


def fuzz_config(max_examples: int = MAX_EXAMPLES,
                semantic: tuple[str, ...] = ()) -> schemathesis.Config:
    """Valid and invalid inputs, derandomized from a fixed seed, no example database (a
    CI run does not depend on what an earlier run found), no stateful phase.

    `semantic`: paths (regexes) whose requests may match the schema and still be refused
    with a 422 for what a schema cannot say (an opaque cursor this service did not give,
    `since` after `until`, a scoped pause without a name): a 422 there is no lie."""
    accept = ["2xx", "3xx", "401", "403", "404", "409", "422", "429"]
    return schemathesis.Config.from_dict({
        "seed": SEED,
        "request-timeout": 30,
        "max-stream-events": 1,  # an event stream: its first event is its answer
        "generation": {"mode": "all", "max-examples": max_examples, "deterministic": True,
                       "database": "none"},
        "phases": {"stateful": {"enabled": False}},
        "operations": [{"include-path-regex": path, "checks": {
            "positive_data_acceptance": {"expected-statuses": accept}}} for path in semantic],
    })


@pytest.fixture(autouse=True)
def _node_id(request: pytest.FixtureRequest) -> None:
    """schemathesis' lazy schemas (4.32) name each operation's subtest through the
    `_nodeid` attribute that pytest 9 no longer has: give it back the node's id."""
    request.node._nodeid = request.node.nodeid
