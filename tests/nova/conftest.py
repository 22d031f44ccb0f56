import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402


def pytest_configure(config):
    # nova.test.TestCase deletes every public attribute after a test (stestr does not mind);
    # pytest then cannot remove the bound test method it set. Keep them: memory is no issue
    # for a few hundred tests.
    from nova import test

    test.TestCase._clear_attrs = lambda self: None


@pytest.fixture(scope="session", autouse=True)
def _stop_fatboxd():
    yield
    harness.stop_daemon()
