"""Shared test configuration.

Tests are tiered by markers: ``unit`` (fast, no external process), ``integration``
(a real database server or a real gRPC server on loopback), ``slow`` (trains models
or runs long computations). Every test carries one of them.
"""

import os

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    # Keep the suite deterministic and polite on a 2-core machine.
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Point CIRCUITSCOPE_HOME at a per-session temp dir so tests never touch the user's data."""
    home = tmp_path_factory.getbasetemp() / "circuitscope-home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("CIRCUITSCOPE_HOME", str(home))
