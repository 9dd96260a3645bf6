import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import WASM, Envoy, Mock, secrets  # noqa: E402


def pytest_sessionstart(session):
    if not WASM.exists():
        raise pytest.UsageError(f"{WASM} is missing: run `make test`, which builds it first")


def _starts(make):
    """For a fixture: yields a function that starts things with make(...),
    then stops every one it started."""
    started = []

    def start(*args, **kw):
        thing = make(*args, **kw)
        started.append(thing)
        return thing

    yield start
    for thing in started:
        thing.stop()


@pytest.fixture
def start_mock():
    """Starts mock providers (harness.Mock's arguments); stops every one started."""
    yield from _starts(Mock)


@pytest.fixture
def start_envoy():
    """Starts Envoy with the built filter in front of a mock (harness.Envoy's
    keyword arguments); stops every one started."""
    yield from _starts(lambda mock, **kw: Envoy(mock.port, **kw))


@pytest.fixture
def started():
    """A list for the things a test starts (anything with stop()); each is
    stopped at the test's end, the last started first."""
    things = []
    yield things
    for t in reversed(things):
        t.stop()


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
