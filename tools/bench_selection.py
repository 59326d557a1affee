#!/usr/bin/env python
"""Benchmark the selection policies on a realistic global superbatch; prints ONE JSON line.

The same command as ``cabs-bench-selection``; the benchmark is
:mod:`cabs_streaming.bench.selection`::

    NUMBA_NUM_THREADS=1 python tools/bench_selection.py
"""

import sys

from cabs_streaming.bench.selection import main

if __name__ == "__main__":
    sys.exit(main())
