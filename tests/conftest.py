"""Session checks: the embedded sample is required by the tests, never silently replaced."""

from __future__ import annotations

import pytest
from paths import SAMPLE


def pytest_sessionstart(session: pytest.Session) -> None:
    if not (SAMPLE / "train" / "index.json").is_file():
        raise pytest.UsageError(
            f"the embedded sample data/sample is missing ({SAMPLE / 'train' / 'index.json'} "
            "not found): regenerate it with tools/make_sample.py"
        )
