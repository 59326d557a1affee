#!/usr/bin/env python
"""Measure caption-tagging speed: one JSON line with ``captions_per_s`` on one core.

The same command as ``cabs-bench-tagging``; the benchmark is :mod:`cabs_streaming.bench.tagging`.
"""

import sys

from cabs_streaming.bench.tagging import main

if __name__ == "__main__":
    sys.exit(main())
