"""Shared fixtures: the real data beside the checkout, small models, and a network that is off."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data`: required in CI (CI=true), skipped with a reason elsewhere."""
    if not SHARED_DATA.is_dir():
        message = f"shared test data not found at {SHARED_DATA}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return SHARED_DATA


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to resolve a host or open a connection fails at once, as on an offline machine."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network disabled by the no_network test fixture")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
