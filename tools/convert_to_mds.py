#!/usr/bin/env python
r"""Convert WebDataset tars, parquet files or a JSONL manifest into MDS shards (schema v1).

A thin command line over :func:`cabs_streaming.convert.convert`; ``--help`` lists the options and
the module docstring of ``cabs_streaming/convert.py`` explains the design. Example::

    python tools/convert_to_mds.py --input shards/ --format webdataset --out s3://bucket/mds

The exit status says how it went (0 done, 3 damaged inputs, 4 nothing written or most of the
input skipped for one reason, 5 output busy, ...: the table is at the end of ``--help``).

Data with captions but no concepts: take the ids from the captions with a tagging vocabulary
(``coco``, ``imagenet1k`` or your own file, see ``cabs_streaming/tagging.py``), or from your own
image tagger, a function ``(image_bytes, caption) -> list of names``::

    python tools/convert_to_mds.py --input set.parquet --format parquet --out mds \
        --tag-captions coco
    python tools/convert_to_mds.py --input shards/ --format webdataset --out mds \
        --tagger my_detector.py:tag_image --vocabulary vocabulary.json
"""

import sys
from pathlib import Path

try:
    from cabs_streaming.convert import main
except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from cabs_streaming.convert import main

if __name__ == "__main__":
    sys.exit(main())
