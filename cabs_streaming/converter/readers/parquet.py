"""Parquet files: image bytes, ``{bytes, path}`` structs or paths; concepts as lists or ids.

A ``--numeric-column NAME`` is the row's cell of column ``NAME`` (an integer or floating-point
column; a file without it, or with another type, cannot be converted, like a missing caption
column); a null, NaN or out-of-range cell is a ``bad numeric`` skip.

Columns are checked once per file against its Arrow schema (every problem in one error), then
read in record batches of the needed columns only. A null concepts cell is an empty list, as
Arrow writers commonly store empty lists. A file that stops reading keeps every row before it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from cabs_streaming.converter.readers.files import read_image_file
from cabs_streaming.converter.records import (
    ConversionError,
    DamagedInput,
    ImageRead,
    ReadOptions,
    Record,
)
from cabs_streaming.converter.text import as_text, decode_text


def _image_bytes(value: bytes | bytearray, what: str, limit: int) -> ImageRead:
    """Image bytes from a cell, refused when empty or over ``max_member_bytes``."""
    if not value:
        return None, f"{what} is empty", "missing image"
    if len(value) > limit:
        return (
            None,
            (f"{what} is {len(value):,} bytes, over --max-member-bytes {limit:,}"),
            "over a size limit",
        )
    return bytes(value), "", ""


def _parquet_image(value: Any, base: str, opts: ReadOptions) -> ImageRead:
    """Read an image cell: bytes, an HF-datasets ``{bytes, path}`` struct, or a path string."""
    limit = opts.limits.max_member_bytes
    if value is None:
        return None, "image cell is null", "missing image"
    if isinstance(value, dict):
        if value.get("bytes"):
            return _image_bytes(value["bytes"], "image struct's bytes", limit)
        if value.get("path"):
            return read_image_file(str(value["path"]), base, opts)
        return None, "image struct has neither bytes nor path", "missing image"
    if isinstance(value, bytes | bytearray):
        return _image_bytes(value, "image cell", limit)
    if isinstance(value, str):
        return read_image_file(value, base, opts)
    return None, f"image cell holds a {type(value).__name__}", "missing image"


def _is_text_type(kind: Any) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(kind):
        return _is_text_type(kind.value_type)
    return (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
        or pa.types.is_null(kind)
    )


def _is_image_type(kind: Any) -> bool:
    import pyarrow as pa

    if pa.types.is_struct(kind):  # Hugging Face datasets' Image feature
        fields = {kind.field(i).name: kind.field(i).type for i in range(kind.num_fields)}
        data, path = fields.get("bytes"), fields.get("path")
        return (
            (data is not None or path is not None)
            and (data is None or _pa_is_binary(data) or pa.types.is_null(data))
            and (path is None or _is_text_type(path))
        )
    return _is_text_type(kind) or pa.types.is_fixed_size_binary(kind)


def _concepts_kind(kind: Any) -> str | None:
    """``"list"`` (names or ids per row), ``"scalar"`` (one id per row) or None (refused)."""
    import pyarrow as pa

    if pa.types.is_null(kind):
        return "list"  # every cell null: no concepts anywhere
    if pa.types.is_integer(kind):
        return "scalar"
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        value = kind.value_type
        if pa.types.is_integer(value) or _is_text_type(value):
            return "list"
    return None


#: What ``--concepts-column`` accepts, for the error message.
_CONCEPT_TYPES = (
    "a list of names or integer ids per row (list<string>, list<int64>, large_list, ...; a null "
    "cell is an empty list) or one integer id per row (int64, ...)"
)


@dataclass(frozen=True)
class _ParquetColumns:
    """The columns to read from one parquet file, checked once against its schema."""

    key: str | None
    caption: str
    recaption: str | None
    concepts: str | None
    scalar_concepts: bool  # one integer id per row instead of a list
    image: str
    image_paths: bool  # the image column holds path strings
    numeric: tuple[str, ...] = ()  # the --numeric-column names


def _parquet_columns(path: str, schema: Any, opts: ReadOptions) -> _ParquetColumns:
    """Check names and Arrow types of the needed columns; every problem in one error."""
    names = schema.names
    problems: list[str] = []

    def check(column: str | None, flag: str, accepted: Callable[[Any], bool], what: str) -> None:
        if column is None:
            return
        if column not in names:
            problems.append(f"no column {column!r} (name the right one with {flag})")
        elif not accepted(schema.field(column).type):
            problems.append(
                f"column {column!r} is {schema.field(column).type}, but {flag} needs {what}"
            )

    text = "text (string or binary)"
    check(
        opts.image_column,
        "--image-column",
        _is_image_type,
        "image bytes (binary), {bytes, path} structs or path strings",
    )
    check(opts.caption_column, "--caption-column", _is_text_type, text)
    check(opts.recaption_column, "--recaption-column", _is_text_type, text)
    key = opts.key_column or ("key" if "key" in names else None)
    check(key, "--key-column", lambda t: _is_text_type(t) or _pa_is_integer(t), "text or integers")
    numeric = tuple(name for name, _ in opts.numeric_columns)
    for name in numeric:
        check(name, "--numeric-column", _is_numeric_type, "numbers (integer or floating point)")
    concepts = opts.concepts_column if opts.read_concepts else None
    kind = None
    if concepts is not None and concepts not in names:
        hint = (
            " or, as the file has captions, take concepts from them with --tag-captions "
            "VOCABULARY (e.g. coco) or from your own tagger with --tagger MODULE:FUNCTION"
            if opts.caption_column in names
            else ""
        )
        problems.append(f"no column {concepts!r} (name the right one with --concepts-column){hint}")
    elif concepts is not None:
        kind = _concepts_kind(schema.field(concepts).type)
        if kind is None:
            problems.append(
                f"column {concepts!r} is {schema.field(concepts).type}, but --concepts-column "
                f"needs {_CONCEPT_TYPES}"
            )
    if problems:
        raise ConversionError(
            f"{path} cannot be converted: "
            + "; ".join(problems)
            + f" (its columns: {', '.join(names)})"
        )
    image_type = schema.field(opts.image_column).type
    return _ParquetColumns(
        key=key,
        caption=opts.caption_column,
        recaption=opts.recaption_column,
        concepts=concepts,
        scalar_concepts=kind == "scalar",
        image=opts.image_column,
        image_paths=_is_text_type(image_type) and not _pa_is_binary(image_type),
        numeric=numeric,
    )


def _pa_is_integer(kind: Any) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_integer(kind))


def _is_numeric_type(kind: Any) -> bool:
    """Arrow types a ``--numeric-column`` may have; each value is still checked (null, NaN...)."""
    import pyarrow as pa

    return bool(pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_null(kind))


def _pa_is_binary(kind: Any) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_binary(kind) or pa.types.is_large_binary(kind))


def _arrow_pylist(column: Any) -> list[Any]:
    """Python values of a column, with strings as bytes so that invalid UTF-8 cannot raise."""
    import pyarrow as pa

    kind = column.type
    if pa.types.is_dictionary(kind):
        column, kind = column.cast(kind.value_type), kind.value_type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        column = column.cast(pa.binary())
    elif (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and (
        pa.types.is_string(kind.value_type) or pa.types.is_large_string(kind.value_type)
    ):
        column = column.cast(pa.list_(pa.binary()))
    return column.to_pylist()


def _concept_cell(value: Any, scalar: bool) -> list[Any]:
    """A concepts cell as a list of entries: null is empty, a scalar id is a list of one."""
    if value is None:
        return []
    return [value] if scalar else list(value)


def read_parquet(path: str, opts: ReadOptions, with_images: bool) -> Iterator[Record]:
    """Rows of one parquet file, read in record batches of the needed columns only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DamagedInput(f"not a readable parquet file ({err})") from err
    plan = _parquet_columns(path, parquet.schema_arrow, opts)
    key, caption, concepts, recaption = plan.key, plan.caption, plan.concepts, plan.recaption
    columns = [c for c in (key, caption, concepts, recaption, *plan.numeric) if c]
    if with_images:
        columns.append(plan.image)
    columns = list(dict.fromkeys(columns))
    base, file_name = opts.image_base or os.path.dirname(path), os.path.basename(path)
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=256 if with_images else 8192, columns=columns):
            values = {c: _arrow_pylist(batch.column(c)) for c in columns}
            for j in range(batch.num_rows):
                rec = Record(index=row, label=f"row {row}")
                key_value, fixed = as_text(values[key][j]) if key else (None, False)
                rec.key = key_value if key_value else f"{file_name}:{row}"
                rec.label = rec.key
                rec.caption, fixed_caption = as_text(values[caption][j])
                recaption_value, fixed_re = (
                    as_text(values[recaption][j]) if recaption else (None, False)
                )
                rec.recaption = recaption_value or ""
                rec.repaired = fixed or fixed_caption or fixed_re
                rec.numbers = {name: values[name][j] for name in plan.numeric}
                cell = values[concepts][j] if concepts else None
                for entry in _concept_cell(cell, plan.scalar_concepts):
                    if isinstance(entry, bytes):
                        entry, fixed = decode_text(entry)
                        rec.repaired |= fixed
                    rec.concepts.append(entry)
                if with_images:
                    image = values[plan.image][j]
                    if plan.image_paths and isinstance(image, bytes):
                        image = os.fsdecode(image)
                    rec.image, rec.image_problem, rec.image_reason = _parquet_image(
                        image, base, opts
                    )
                yield rec
                row += 1
    except (pa.ArrowException, OSError) as err:
        raise DamagedInput(
            f"reading stopped at row {row} ({err}); the rows before it were read and judged as "
            "usual. Rewrite this file to recover the rest"
        ) from err
