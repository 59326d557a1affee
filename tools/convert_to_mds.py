#!/usr/bin/env python
r"""Convert WebDataset tars, parquet files or a JSONL manifest into MDS shards (schema v1).

The same command as ``cabs-convert`` (installed with the package); the command line lives in
:mod:`cabs_streaming.cli.convert` and the design in :mod:`cabs_streaming.converter`. Example::

    python tools/convert_to_mds.py --input shards/ --format webdataset --out s3://bucket/mds

``--help`` lists the options and the exit statuses.
"""

import sys

from cabs_streaming.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
