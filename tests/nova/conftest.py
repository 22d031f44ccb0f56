import os
import signal
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402


def _terminate(signum, frame):
    # SIGTERM (a CI timeout, `timeout`) must still clean up the harness (fatboxd's
    # instances, the private OVS, fatbox-procfs). pytest ends the session on
    # KeyboardInterrupt and runs the teardowns; a SystemExit in a test would only fail it.
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config):
    signal.signal(signal.SIGTERM, _terminate)
    # nova.test.TestCase deletes every public attribute after a test (stestr does not mind);
    # pytest then cannot remove the bound test method it set. Keep them: memory is no issue
    # for a few hundred tests.
    from nova import test

    test.TestCase._clear_attrs = lambda self: None


@pytest.fixture(scope="session", autouse=True)
def _stop_fatboxd():
    yield
    harness.stop_glance_daemon()
    harness.stop_daemon()
