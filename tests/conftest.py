import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import WASM, Envoy, Mock, secrets  # noqa: E402


def pytest_sessionstart(session):
    if not WASM.exists():
        raise pytest.UsageError(f"{WASM} is missing: run `make test`, which builds it first")


@pytest.fixture
def mock():
    m = Mock()
    yield m
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
def mock3():
    """A mock provider that accepts secrets(3)."""
    m = Mock(keys=secrets(3))
    yield m
    m.stop()


@pytest.fixture
def five_keys():
    """A mock provider that accepts secrets(5)."""
    m = Mock(keys=secrets(5))
    yield m
    m.stop()
