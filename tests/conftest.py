"""Shared test set-up: marks tests under tests/integration so they can be selected."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from livemig import config


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in Path(str(item.fspath)).parts:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _no_configuration_carried_over() -> Iterator[None]:
    """A test that ran the CLI with --config made that file this process's host; the
    next test must start as a process of no host again."""
    yield
    config.forget()
