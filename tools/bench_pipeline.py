#!/usr/bin/env python
"""Benchmark the training input pipeline end to end (no model step); prints ONE JSON line.

The same command as ``cabs-bench-pipeline``; what it measures and why is in
:mod:`cabs_streaming.bench.pipeline`::

    python tools/bench_pipeline.py --configs iid,deferred,lookahead --model-step-ms 500
"""

import sys

from cabs_streaming.bench.pipeline import main

if __name__ == "__main__":
    sys.exit(main())
