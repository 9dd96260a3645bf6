import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import WASM, Envoy, Mock, secrets  # noqa: E402


def pytest_sessionstart(session):
    if not WASM.exists():
        raise pytest.UsageError(f"{WASM} is missing: run `make test`, which builds it first")


@pytest.fixture
def start_mock():
    """Starts mock providers (harness.Mock, same arguments); stops every one started."""
    started = []

    def start(keys=None, **kw):
        m = Mock(keys=keys, **kw)
        started.append(m)
        return m

    yield start
    for m in started:
        m.stop()


@pytest.fixture
def start_envoy():
    """Starts Envoy with the built filter; stops every one started."""
    started = []

    def start(mock, **kw):
        e = Envoy(mock.port, **kw)
        started.append(e)
        return e

    yield start
    for e in started:
        e.stop()


@pytest.fixture
def mock(start_mock):
    """A mock provider that accepts the demo keys."""
    return start_mock()


@pytest.fixture
def mock3(start_mock):
    """A mock provider that accepts secrets(3)."""
    return start_mock(secrets(3))


@pytest.fixture
def five_keys(start_mock):
    """A mock provider that accepts secrets(5)."""
    return start_mock(secrets(5))
