"""The integration fixtures (production clients on the real servers) for these tests."""

from tests.integration.conftest import db, mongo, redis_client  # noqa: F401
