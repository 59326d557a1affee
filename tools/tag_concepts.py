#!/usr/bin/env python
r"""Tag captions with concept ids, or map detector names onto a vocabulary, from the shell.

The same command as ``cabs-tag`` (installed with the package); the command line lives in
:mod:`cabs_streaming.cli.tag` and the matching rules in :mod:`cabs_streaming.tagging`::

    python tools/tag_concepts.py --vocabulary coco "Two hot dogs and a puppy on a sofa"
"""

import sys

from cabs_streaming.cli.tag import main

if __name__ == "__main__":
    sys.exit(main())
