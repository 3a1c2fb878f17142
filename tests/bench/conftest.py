"""Fixtures of the bench's command-line tests."""
import pytest

from ahnet.commands import bench as cli


@pytest.fixture
def no_measurement(monkeypatch):
    """Any measurement the command would start fails the test (the options must be refused first)."""
    def refuse(*a, **k):
        raise AssertionError("a measurement ran although the options were bad")
    monkeypatch.setattr(cli, "run_worker", refuse)
