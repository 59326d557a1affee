#!/usr/bin/env python
r"""Write ``concept_counts.json`` for an MDS dataset converted before the converter wrote it.

The same command as ``cabs-count-concepts`` (installed with the package); the command line lives
in :mod:`cabs_streaming.cli.count`. Example::

    python tools/count_concepts.py data/mds
"""

import sys

from cabs_streaming.cli.count import main

if __name__ == "__main__":
    sys.exit(main())
