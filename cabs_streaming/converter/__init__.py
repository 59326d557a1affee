"""Convert image-text data into MDS schema v1 shards with ``vocabulary.json`` and ``report.json``.

Inputs are WebDataset tars (DataComp / DataConcept layout), parquet files, or a JSONL manifest
beside its image files. The output is a local directory or a remote prefix (``s3://bucket/path``;
the endpoint comes from ``S3_ENDPOINT_URL``, credentials from boto3's default chain) holding MDS
shards in the ``MDS_COLUMNS`` schema of :mod:`cabs_streaming.concepts`, ``vocabulary.json``
beside ``index.json``, and ``report.json`` saying what was read, written and skipped and why.
``cabs-convert`` (``tools/convert_to_mds.py``, :mod:`cabs_streaming.cli.convert`) is the command
line; :func:`convert` is the same thing for Python.

How it works, and why
---------------------
**Two passes, no images held.** Concept ids must be final when a shard is written (shards are
never rewritten), yet a vocabulary built from the data is ordered by frequency, which is known only
after the whole input has been seen. So the converter reads the input twice:

1. *Scan* reads only what decides a sample's fate without its image: parquet projects the key,
   caption and concept columns; tar image members are streamed past unread; a JSONL manifest is
   read without opening any image. It drops malformed records, missing captions and unknown
   concepts, gives every key to the first remaining sample that carries it (input order), and
   counts concept names over those key owners. The vocabulary (most frequent first, ties by name;
   frequency = detected instances) is fixed from these counts.
2. *Write* reads everything again, checks each image (present, decodable by a cheap PIL decode),
   and writes the survivors with final ids. Images are stored exactly as found.

A consequence to know: a sample that passes the scan but is then dropped for its image (missing
or undecodable) has already been counted, so a concept seen only in such samples can appear in a
built vocabulary with no written instance. Ids are only an ordering, so nothing breaks.

**Duplicate keys are decided in the scan**, globally and in input order: the first sample whose
metadata is valid owns its key and every later sample with that key is a ``duplicate key``, even
when the owner is later dropped for its image. Deciding there makes the answer independent of
``workers`` and needs no pass over written shards. It costs one Python set of keys in the parent
process (roughly 100 bytes a key, about 1 GB per 10 M samples); convert a larger corpus as several
datasets (Streaming mixes them as streams) if that is too much.

**Parallel writing.** With ``workers > 1`` the input files are split into that many contiguous
runs (balanced by the scan's sample counts); each worker process writes its run into
``part-NNNNN/`` and ``streaming.base.util.merge_index`` joins the parts in order. Sample order is
therefore input order for every ``workers`` value, and a given input and ``workers`` always yield
the same shards. ``workers == 1`` writes the shards directly into the output directory.

**Damaged input is counted, not fatal.** A tar that ends early (cut mid-member, or without its
end-of-archive blocks) or a parquet file that stops reading keeps every sample read before the
damage. The sample being read at the cut is judged on the members that arrived whole, so it
usually becomes a ``missing image`` or ``missing concepts`` skip. The file and the error are listed
under ``errors`` in the report (the CLI then exits with status 3), and ``read == written +
sum(skipped)`` holds as always.

**WebDataset layout.** A sample is a run of adjacent members sharing a key; its caption comes
from the json's ``caption`` or else from a ``.txt`` (or ``.caption``) member, so img2dataset's
``.jpg`` + ``.txt`` tars convert with ``--tag-captions``. The same member extension twice in a
run starts a new sample with the same key (a ``duplicate key`` skip, counted). Members of a key
seen earlier in the tar but not adjacent to it, with none of its extensions, are a fragment of
that sample, not a sample: they are ignored and the file is listed under ``errors``.

**Text.** Invalid UTF-8 in captions, json members or manifest lines is decoded with U+FFFD
replacement, the sample is kept, and the written samples affected are counted under
``repaired["invalid utf-8"]``. A caption that is empty or holds only whitespace and control
characters is a ``missing caption``; a json caption that is not a string is ``malformed json``.

**Concept annotations.** An empty concept list is kept. A *missing* annotation is not an empty
one: a sample without the field chosen by ``concepts_from`` (``classes`` or ``tags`` of the json,
or a ``.cls`` member), or without a json at all, is ``missing concepts``, and the report says to
take them from the captions (``--tag-captions``) or a tagger (``--tagger``). In parquet a null
concepts cell is read as an empty list, since Arrow writers commonly store empty lists that way;
the column's Arrow type is checked once per file (lists of names or integer ids, or one integer
id per row). Detection ``scores`` must be finite numbers in ``[0, 1]`` (else ``malformed json``).
A concept name not in a given vocabulary, an empty name, a
null entry or an id outside ``[0, len(vocabulary))`` is an ``unknown concept``. Names are matched
onto a given vocabulary as written, then in normal form (case, plural, whitespace, punctuation;
:class:`cabs_streaming.tagging.ConceptNameMapper`), so a detector's "Dogs" or "hot_dog" finds
"dog" or "hot dog"; ``report.json`` counts the names that matched nothing (``concept_names``).

**Data without concepts.** ``--tag-captions VOCABULARY`` takes the ids from the caption with
:class:`cabs_streaming.tagging.CaptionTagger` (in both passes: it is cheap), and the vocabulary
file fixes the ids. ``--tagger module:function`` calls the user's function on (image bytes,
caption) for names, e.g. an image tagger or detector on their own hardware. It may be expensive,
so it runs once per sample, in the scan, which then reads images; the names are kept in a
temporary file per input file and read back by the write pass. Either replaces the input's own
concepts, so neither can be combined with ``--concepts-from`` / ``--concepts-column``.

**Hostile input.** Nothing is extracted or executed, and sizes are bounded (:class:`Limits`, with
defaults real data never reaches): a tar member, manifest line, parquet image cell or image file
larger than ``max_member_bytes`` is never read whole, a caption over ``max_caption_bytes`` and an
image over ``max_image_pixels`` (checked from its header, before decoding) are skipped as ``over a
size limit`` naming the limit. A json nested too deeply is ``malformed json``. Image paths in a
manifest or a parquet file must resolve (after ``..`` and symbolic links) inside that file's
folder or a folder given as ``image_roots``, and name a regular file: never a device, a FIFO or a
file elsewhere on the machine.

**One conversion per output.** ``--out`` is locked for the whole conversion: a local folder with
``flock`` on the folder itself (released by the kernel if the process dies), an ``s3://`` prefix
with a lock object under ``.convert-lock/`` that is removed at the end (a crashed conversion
leaves it behind: ``break_lock`` removes it). A second conversion into the same output stops at
once with :class:`OutputBusy` instead of interleaving its shards with the first one's.

Modules, by job
---------------
``records`` (the candidate record, options, limits, errors, skip reasons), ``text`` (lenient
decoding, strict json fields), ``readers/`` (one module per input format, and the confined image
files of manifests and parquet), ``sources`` (concepts from the input, the captions or a
tagger), ``judge`` (the checks both passes share, and the image check), ``passes`` (scan one
file, write one part), ``progress`` (bars across processes), ``tally`` (counts and the report),
``output`` (checking, locking and publishing ``--out``), ``api`` (:func:`convert`), ``spark``
(:func:`convert_on_spark`: the same passes as Spark tasks, resumable, for corpora beyond one
machine). Readers, the judge and the part writer are plain functions, so an engine schedules
them in place of the process pool (docs/design.md#one-converter-several-engines).
"""

from __future__ import annotations

from cabs_streaming.converter.api import convert
from cabs_streaming.converter.judge import image_problem
from cabs_streaming.converter.records import (
    CONCEPT_SOURCES,
    EXIT_STATUSES,
    FORMATS,
    REPORT_FILENAME,
    SKIP_REASONS,
    ConversionError,
    Limits,
    OutputBusy,
)
from cabs_streaming.converter.spark import convert_on_spark

__all__ = [
    "CONCEPT_SOURCES",
    "EXIT_STATUSES",
    "FORMATS",
    "REPORT_FILENAME",
    "SKIP_REASONS",
    "ConversionError",
    "Limits",
    "OutputBusy",
    "convert",
    "convert_on_spark",
    "image_problem",
]
