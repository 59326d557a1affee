"""One reader per input format: ``read(path, options, with_images) -> Iterator[Record]``.

A reader only gathers what it finds into :class:`~cabs_streaming.converter.records.Record`s,
judging nothing, and raises ``DamagedInput`` at the end of a file that stopped reading part-way.
Without ``with_images`` it skips image bytes (the scan pass). Readers are plain functions of one
file, so any engine (the process pool here, Spark later) can run them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from cabs_streaming.converter.readers.jsonl import read_jsonl
from cabs_streaming.converter.readers.parquet import read_parquet
from cabs_streaming.converter.readers.webdataset import read_webdataset
from cabs_streaming.converter.records import ReadOptions, Record

__all__ = ["READERS", "read_jsonl", "read_parquet", "read_webdataset"]

#: Format name -> reader.
READERS: dict[str, Callable[[str, ReadOptions, bool], Iterator[Record]]] = {
    "webdataset": read_webdataset,
    "parquet": read_parquet,
    "jsonl": read_jsonl,
}
