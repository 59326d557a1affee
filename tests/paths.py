"""Paths every test module shares, and the rule for tests that need the sample's source packages.

The embedded sample (``data/sample``) is a hard requirement: ``conftest.py`` refuses to start a
session without it, so no test checks for it or substitutes other data.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import matplotlib
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
# A large real photograph (512x600 baseline JPEG; matplotlib is a dependency of mosaicml-streaming).
PHOTO = Path(matplotlib.__file__).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg"

REQUIRE_SAMPLE_SOURCES = "CABS_REQUIRE_SAMPLE_SOURCES"


def sample_sources_required() -> bool:
    """True when ``CABS_REQUIRE_SAMPLE_SOURCES=1``: CI installs the sources and sets it."""
    return os.environ.get(REQUIRE_SAMPLE_SOURCES) == "1"


def missing_sample_sources(reason: str) -> NoReturn:
    """Skip a test that needs the sample's source packages, or fail it where they are required."""
    __tracebackhide__ = True  # report the calling test's line, not this one
    if sample_sources_required():
        pytest.fail(f"{reason}, and {REQUIRE_SAMPLE_SOURCES}=1 requires them", pytrace=False)
    pytest.skip(reason)
