#!/usr/bin/env python
r"""Write a concept report for an MDS dataset: PNG figures and a JSON summary.

The same command as ``cabs-report`` (installed with the package); the command line lives in
:mod:`cabs_streaming.cli.report` and what the report shows in :mod:`cabs_streaming.report`::

    python tools/concept_report.py data/sample/train --out reports/sample --concept-cap 16
"""

import sys

from cabs_streaming.cli.report import main

if __name__ == "__main__":
    sys.exit(main())
