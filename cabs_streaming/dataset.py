"""ConceptStreamingDataset: MDS schema v1 samples with encoded images, captions and concept ids.

The dataset is the first stage of the CABS data flow (docs/design.md#the-data-flow): it hands out
each sample with its image still ENCODED (docs/design.md#deferred-decoding: only the images the
selection policy keeps are ever decoded, by ``cabs_streaming.decode``), the chosen caption,
optional caption tokens and the sample's concept ids. ``ConceptCollator`` packs a superbatch of
such samples into the ragged concept-id form the selection engine takes.

Everything here is deterministic in (shuffle seed, epoch, global sample index), so a resumed run
sees exactly the samples and captions the uninterrupted run would have seen. Nothing here imports
Composer: the dataset is a plain ``streaming.StreamingDataset`` and is what Composer checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from streaming import StreamingDataset
from streaming.base.hashing import get_hash
from torch.utils.data import DataLoader

from cabs_streaming import _internals
from cabs_streaming.choices import check_caption
from cabs_streaming.concepts import (
    CONCEPT_COUNTS_FILENAME,
    DERIVED_COLUMNS,
    VOCABULARY_FILENAME,
    ConceptCounts,
    Vocabulary,
    decode_concepts,
    decode_scores,
    ragged_from_lists,
)

__all__ = [
    "CaptionTokenizer",
    "EncodedImages",
    "ShardError",
    "ConceptCollator",
    "ConceptStreamingDataset",
    "LookaheadDataLoader",
    "collate_concepts",
    "num_samples_in_batch",
]


class CaptionTokenizer:
    """A picklable, lazily built open_clip tokenizer, named rather than carried.

    open_clip's BPE tokenizer pickles to about 2 MB, and DataLoader workers receive a pickled copy
    of the dataset and collate function; holding only the name and building the tokenizer on first
    use in each process keeps worker start-up cheap. Calling it maps a list of captions to a
    ``LongTensor [n, context_length]``. Use it in the dataset (tokenize every drawn caption) or
    after selection (tokenize only the kept captions; the dataset then runs with
    ``tokenizer=None`` and the captions travel as strings).
    """

    def __init__(self, name: str, context_length: int | None = None) -> None:
        self.name = name
        self._requested_context_length = context_length
        self._tokenizer: Callable[..., torch.Tensor] | None = None

    def _get(self) -> Callable[..., torch.Tensor]:
        if self._tokenizer is None:
            import open_clip  # heavy import: only in processes that tokenize

            self._tokenizer = open_clip.get_tokenizer(
                self.name, context_length=self._requested_context_length
            )
        return self._tokenizer

    @property
    def context_length(self) -> int:
        """Token sequence length of every output row."""
        return int(self._get().context_length)

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        """Tokenize ``captions`` into a ``LongTensor [len(captions), context_length]``."""
        return self._get()(list(captions)).long()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tokenizer"] = None
        return state

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name!r}, "
            f"context_length={self._requested_context_length!r})"
        )


def _as_tokenizer(
    tokenizer: str | CaptionTokenizer | None, context_length: int | None
) -> CaptionTokenizer | None:
    if tokenizer is None or isinstance(tokenizer, CaptionTokenizer):
        return tokenizer
    return CaptionTokenizer(tokenizer, context_length=context_length)


def _as_columns(columns: Sequence[str] | None) -> tuple[str, ...]:
    """``columns=`` checked for shape here; whether the shards have them, after loading."""
    if columns is None:
        return ()
    if isinstance(columns, str):
        raise TypeError(f"columns must be a list of column names, got the string {columns!r}")
    names = tuple(columns)
    if any(not isinstance(name, str) or not name for name in names):
        raise ValueError(f"columns must be non-empty names, got {list(names)!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"columns names a column twice: {list(names)!r}")
    return names


def _column_values(raw: dict[str, Any], names: Sequence[str]) -> dict[str, float]:
    """A sample's numeric columns as floats; derived ones from its ``concept_scores``."""
    values: dict[str, float] = {}
    scores: np.ndarray | None = None
    for name in names:
        if name in DERIVED_COLUMNS:
            if scores is None:
                scores = decode_scores(raw["concept_scores"])
            if not scores.size:
                values[name] = float("nan")
            else:
                values[name] = float(scores.min() if name == "concept_score_min" else scores.max())
        else:
            values[name] = float(raw[name])
    return values


class _DownloadFailed(Exception):
    """A file beside ``index.json`` could not be downloaded; the message names it."""


class ShardError(ValueError):
    """A shard could not be downloaded, validated or opened; the message names it.

    A plain one-string exception, so a DataLoader worker can re-raise it in the main process.
    """


def _shard_hint(err: BaseException) -> str:
    text = str(err)
    if "Checksum failure" in text:
        return (
            "its bytes do not match the hash in index.json: the shard is corrupt or was changed "
            "after conversion. Re-upload or re-convert it, and delete the copy in the local cache"
        )
    if "does not match with those provided" in text:
        return (
            "index.json carries no hash of that algorithm: convert with tools/convert_to_mds.py "
            "(xxh64 by default) or set train_data.validate_hash to null"
        )
    return "check that the shard exists remotely and that S3_ENDPOINT_URL and credentials are set"


class ConceptStreamingDataset(StreamingDataset):
    """A ``StreamingDataset`` over MDS schema v1 that keeps images encoded for deferred decoding.

    Each sample is a dict:

    - ``key`` (str): the unique sample id.
    - ``index`` (int): the sample's global index in the dataset (what ``__getitem__`` got): the
      canonical order of world-invariant selection (docs/selection.md#world-invariant-selection).
    - ``image`` (bytes): the encoded image file exactly as stored; decode only what you keep
      (``cabs_streaming.decode.ImageDecoder``).
    - ``caption`` (str): the chosen caption (see ``caption`` below), always present so that
      tokenization can be deferred to the kept samples.
    - ``text`` (``LongTensor [context_length]``): the tokenized caption, only when ``tokenizer``
      is set.
    - ``concepts`` (``np.ndarray`` int32): the sample's concept ids, a writable copy.
    - ``columns`` (``dict[str, float]``): the numeric columns asked for with ``columns``, only
      then. A stored ``int64`` above 2**53 loses precision as a float.

    Args:
        caption: ``"caption"`` (alt-text), ``"recaption"`` (the synthetic caption, falling back
            to the alt-text where a sample has none) or a probability ``p`` of using the
            recaption where it is non-empty. The draw is
            ``numpy.random.default_rng([shuffle_seed, sample_index, epoch]).random() < p``: the
            same for every rank, worker count and resumption, different across epochs.
        tokenizer: an open_clip model or tokenizer name (``"ViT-B-32"``) to tokenize captions in
            the loader, or ``None`` to leave them as strings (tokenize after selection with
            ``CaptionTokenizer`` or ``ConceptCollator(tokenizer=...)``).
        context_length: token length override for ``tokenizer``.
        columns: per-sample numbers to carry into ``sample["columns"]`` (and the collated
            ``batch["columns"]``), for a policy that selects on them: MDS scalar columns written
            with ``cabs-convert --numeric-column`` (each must be in every stream's shards, else a
            ``ValueError`` names the stream and the columns it has), or the derived
            ``concept_score_min`` / ``concept_score_max``: the min / max of the sample's
            ``concept_scores`` (detection confidences, float16), NaN when it has none. Default
            None: no ``columns`` entry, and batches stay as they were.
        **kwargs: every ``streaming.StreamingDataset`` argument (``remote``, ``local``,
            ``streams``, ``batch_size``, ``shuffle``, ``shuffle_seed``, ...). ``batch_size`` must
            equal the per-rank DataLoader batch size, which for CABS is the superbatch size.

    Where the epoch and seed come from: streaming 0.13 counts epochs in shared memory and each
    ``__iter__`` (in each DataLoader worker) resolves its epoch in ``_resume_incr_epoch``, which
    also restores ``shuffle_seed`` from a loaded checkpoint state. We record that epoch per
    process (``current_epoch``); ``shuffle_seed`` is the dataset's attribute. Outside iteration
    (random access ``dataset[i]``) the epoch is the one last started on this node, 0 before any.

    The vocabulary (``vocabulary.json`` beside each stream's ``index.json``) is read from the
    stream's local directory, or downloaded there from its remote with streaming's own downloader
    (``CloudDownloader.direct_download``, with the stream's retry and timeout; streaming 0.13 has
    no ``download_file`` function; see ``cabs_streaming._internals``), and exposed as
    ``.vocabulary``. With several streams, all must carry the same vocabulary, because concept
    ids from different streams are compared by the selection policy.

    ``concept_counts.json`` (written by the converter beside the vocabulary) is read the same way
    and exposed as ``.concept_counts``: a :class:`~cabs_streaming.concepts.ConceptCounts` summed
    over the streams (every stream's file as a whole, whatever its ``proportion``, ``repeat`` or
    ``choose``), or None when a stream has no such file. A policy that needs the counts calls
    ``require_concept_counts(why)``, which says which streams lack them and how to make them.

    Resumption is streaming's (``state_dict`` / ``load_state_dict`` on a fresh instance), with one
    fix for the state Composer saves at an epoch boundary; see ``state_dict``.

    Shard failures are loud. Streaming 0.13 prepares shards in background threads and, when one
    fails (a download that runs out of retries, a checksum mismatch under ``validate_hash``), only
    prints the traceback and ends the epoch early and silently. Here a failing shard raises
    ``ShardError`` naming the shard and what to do, from ``__iter__`` in the process that
    iterates (so through the DataLoader to the trainer), instead of training on a short epoch.

    ``validate_hash`` covers shard files already on disk too. Streaming 0.13 checks a shard's
    hash only right after downloading (or decompressing) it: a local dataset (no ``remote``), or
    a cache entry left by an earlier run, is read unchecked, even one whose download failed the
    check (the file stays in the cache). Here each process hashes a shard file it finds on disk
    the first time it reads a sample of it (once per shard per process; xxh64 runs at several
    GB/s), and a cached copy of a remote shard that fails is deleted, so the next run downloads
    it again instead of trusting it.
    """

    def __init__(
        self,
        *,
        caption: str | float = "caption",
        tokenizer: str | CaptionTokenizer | None = None,
        context_length: int | None = None,
        columns: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        _internals.require_dataset_hooks(StreamingDataset)
        self.caption = check_caption(caption)  # a typo fails here, not in a loader worker
        self.tokenizer = _as_tokenizer(tokenizer, context_length)
        self.columns = _as_columns(columns)
        super().__init__(**kwargs)
        self._current_epoch: int | None = None
        self._checked_shards: set[int] = set()  # shard files hashed by this process
        self.vocabulary = self._load_vocabulary()
        self._streams_without_counts: list[str] = []
        self.concept_counts: ConceptCounts | None = self._load_concept_counts()
        self._check_columns()

    # ----------------------------------------------------------------------------------------
    # Vocabulary
    # ----------------------------------------------------------------------------------------

    @staticmethod
    def _stream_name(stream: Any) -> str:
        where = stream.remote if stream.remote else stream.local
        return os.path.join(where, stream.split) if stream.split else where

    @staticmethod
    def _stream_file(stream: Any, filename: str, attempts: int) -> str:
        """The local path of ``filename`` beside a stream's ``index.json``, downloaded if absent.

        Raises ``FileNotFoundError`` when it is not local and the stream has no remote, or
        ``DownloadFailed`` naming the remote when the download fails.
        """
        local = os.path.join(stream.local, stream.split, filename)
        if os.path.exists(local):
            return local
        if not stream.remote:
            raise FileNotFoundError(f"{local} does not exist and the stream has no remote")
        remote = os.path.join(stream.remote, stream.split, filename)
        # Every rank and process may get here at once on a shared local dir: download to a
        # private name and rename atomically, so nobody reads a half-written file.
        tmp = f"{local}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        try:
            _internals.retry(num_attempts=max(1, attempts))(
                lambda: _internals.direct_download(remote, tmp, stream.download_timeout)
            )()
        except Exception as err:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise _DownloadFailed(f"could not download {remote} to {local} ({err})") from err
        os.replace(tmp, local)
        return local

    def _read_stream_vocabulary(self, stream: Any) -> Vocabulary:
        """Read a stream's vocabulary from local, downloading it from remote when absent."""
        try:
            local = self._stream_file(stream, VOCABULARY_FILENAME, stream.download_retry)
        except (FileNotFoundError, _DownloadFailed) as err:
            raise FileNotFoundError(
                f"{err}: every MDS dataset needs a {VOCABULARY_FILENAME} beside its index.json "
                "(write it with tools/convert_to_mds.py or Vocabulary.save)"
            ) from err
        with open(local, encoding="utf-8") as f:
            return Vocabulary.from_json(f.read(), source=local)

    def _load_concept_counts(self) -> ConceptCounts | None:
        """The streams' ``concept_counts.json`` summed, or None when a stream has none.

        The file is optional (datasets converted before it existed have none), so a failed
        download is tried once and remembered for ``require_concept_counts``' message rather
        than raised; a file that is there but wrong is an error.
        """
        found = []
        for stream in self.streams:
            try:
                local = self._stream_file(stream, CONCEPT_COUNTS_FILENAME, attempts=1)
            except (FileNotFoundError, _DownloadFailed) as err:
                self._streams_without_counts.append(f"{self._stream_name(stream)} ({err})")
                continue
            counts = ConceptCounts.read(local)
            if len(counts) != len(self.vocabulary):
                vocabulary = os.path.join(stream.local, stream.split, VOCABULARY_FILENAME)
                raise ValueError(
                    f"{local} counts {len(counts)} concepts but {vocabulary} has "
                    f"{len(self.vocabulary)}: the two files do not belong together; re-convert "
                    f"the dataset, or delete {CONCEPT_COUNTS_FILENAME} to do without counts"
                )
            found.append(counts)
        return None if self._streams_without_counts else sum(found[1:], found[0])

    def require_concept_counts(self, why: str) -> ConceptCounts:
        """``concept_counts``, or a ``ValueError`` naming the streams without them and the fix.

        ``why`` says who needs them (e.g. ``"selection policy 'balanced'"``) for the message.
        """
        if self.concept_counts is not None:
            return self.concept_counts
        raise ValueError(
            f"{why} needs the dataset-wide concept counts ({CONCEPT_COUNTS_FILENAME} beside "
            "index.json), but these streams have none: "
            + "; ".join(self._streams_without_counts)
            + ". Re-convert them with cabs-convert (tools/convert_to_mds.py), which writes the "
            "file, or count an existing MDS dataset with cabs-count-concepts DIR "
            "(tools/count_concepts.py)"
        )

    def _check_columns(self) -> None:
        """Every stored column asked for is in every shard of every stream, else say what is."""
        stored = [name for name in self.columns if name not in DERIVED_COLUMNS]
        if not stored:
            return
        per_stream: dict[int, set[str]] = {}
        for shard_id in range(len(self.shards)):
            stream = int(self.stream_per_shard[shard_id])
            names = set(_internals.shard_columns(self, shard_id))
            per_stream[stream] = per_stream.get(stream, names) & names
        for index, stream in enumerate(self.streams):
            has = per_stream.get(index, set())
            missing = [name for name in stored if name not in has]
            if missing:
                raise ValueError(
                    f"stream {self._stream_name(stream)!r} has no column "
                    f"{', '.join(map(repr, missing))} in (all of) its shards; its columns: "
                    f"{', '.join(sorted(has)) or 'none'}, and {', '.join(DERIVED_COLUMNS)} are "
                    "always derived. Convert with cabs-convert --numeric-column NAME[:TYPE]"
                )

    def _load_vocabulary(self) -> Vocabulary:
        first = self.streams[0]
        vocabulary = self._read_stream_vocabulary(first)
        for stream in self.streams[1:]:
            other = self._read_stream_vocabulary(stream)
            if other.names != vocabulary.names:
                diff = next(
                    (
                        i
                        for i, (a, b) in enumerate(zip(vocabulary.names, other.names, strict=False))
                        if a != b
                    ),
                    min(len(vocabulary), len(other)),
                )
                raise ValueError(
                    f"streams {self._stream_name(first)!r} ({len(vocabulary)} concepts) and "
                    f"{self._stream_name(stream)!r} ({len(other)} concepts) have different "
                    f"vocabularies (first difference at id {diff}); concept ids must mean the "
                    "same thing in every stream of a mixture: re-tag or remap one of them"
                )
        return vocabulary

    # ----------------------------------------------------------------------------------------
    # Epoch tracking
    # ----------------------------------------------------------------------------------------

    def _resume_incr_epoch(self) -> tuple[int, int]:
        # Streaming resolves the epoch (and restores ``shuffle_seed`` from a loaded state) here,
        # at the start of each ``__iter__`` in each worker; the shared ``next_epoch`` counter is
        # only advanced by the local leader after a barrier, so reading it from ``get_item``
        # could race. Recording the resolved epoch per process is exact.
        epoch, sample_in_epoch = super()._resume_incr_epoch()
        self._current_epoch = epoch
        return epoch, sample_in_epoch

    def state_dict(self, num_samples: int, from_beginning: bool) -> dict[str, Any]:
        """Resume position, correct at epoch boundaries too (see ``StreamingDataset.state_dict``).

        Composer calls ``state_dict(timestamp.sample_in_epoch, from_beginning=True)``, and after an
        epoch ends its ``sample_in_epoch`` is already 0 while streaming still reports the finished
        epoch (``next_epoch - 1``); streaming would then resume by replaying that whole epoch.
        With ``from_beginning=True``, ``num_samples == 0`` means nothing of the coming epoch has
        been drawn, so we record the start of the epoch the next ``__iter__`` would draw. A state
        loaded but not yet iterated is passed through unchanged.
        """
        obj = super().state_dict(num_samples, from_beginning)
        next_epoch = self.next_epoch
        if from_beginning and num_samples == 0 and obj["epoch"] == next_epoch - 1:
            obj["epoch"] = next_epoch
        return obj

    @property
    def current_epoch(self) -> int:
        """The epoch this process is iterating (or last started on this node, for ``ds[i]``)."""
        if self._current_epoch is not None:
            return self._current_epoch
        return max(self.next_epoch - 1, 0)

    # ----------------------------------------------------------------------------------------
    # Samples
    # ----------------------------------------------------------------------------------------

    def choose_caption(self, sample_index: int, caption: str, recaption: str) -> str:
        """Pick the caption a sample trains with, deterministic in (seed, sample index, epoch)."""
        if self.caption == "caption" or not recaption:
            return caption
        if self.caption == "recaption":
            return recaption
        p = float(self.caption)
        if p <= 0.0:
            return caption
        if p >= 1.0:
            return recaption
        rng = np.random.default_rng([self.shuffle_seed, sample_index, self.current_epoch])
        return recaption if rng.random() < p else caption

    def _shard_name(self, sample_index: int) -> str:
        """Human-readable shard path for error messages (remote if any, else local)."""
        return self._shard_label(_internals.shard_of_sample(self, sample_index))

    def _shard_label(self, shard_id: int) -> str:
        stream = _internals.stream_of_shard(self, shard_id)
        basename = _internals.shard_basename(self, shard_id)
        return os.path.join(self._stream_name(stream), basename)

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        """Streaming's ``prepare_shard``, with a failure turned into a ``ShardError``."""
        try:
            super().prepare_shard(shard_id, blocking)
        except ShardError:
            raise
        except Exception as err:
            if "Checksum failure" in str(err):
                self._drop_cached_shard(shard_id)
            raise ShardError(
                f"cannot prepare shard {self._shard_label(shard_id)}: {err}; {_shard_hint(err)}"
            ) from err

    def _check_shard_on_disk(self, shard_id: int) -> None:
        """Hash shard ``shard_id``'s files on disk once in this process, under ``validate_hash``.

        Files not on disk yet are left to the download, which streaming checks itself.
        """
        if shard_id in self._checked_shards:
            return
        stream = _internals.stream_of_shard(self, shard_id)
        algo = stream.validate_hash
        if not algo:
            self._checked_shards.add(shard_id)
            return
        for raw_info, _ in _internals.shard_files(self, shard_id):
            path = os.path.join(stream.local, stream.split or "", raw_info.basename)
            if not os.path.isfile(path):
                return
            problem = None
            if algo not in raw_info.hashes:
                problem = (
                    f"Hash algorithm `{algo}` chosen for data validation does not match with "
                    f"those provided during dataset creation `{sorted(raw_info.hashes)}`"
                )
            else:
                with open(path, "rb") as f:
                    if get_hash(algo, f.read()) != raw_info.hashes[algo]:
                        problem = f"Checksum failure: {path}"
                        self._drop_cached_shard(shard_id)
            if problem is not None:
                raise ShardError(
                    f"cannot prepare shard {self._shard_label(shard_id)}: {problem}; "
                    f"{_shard_hint(ValueError(problem))}"
                )
        self._checked_shards.add(shard_id)

    def _drop_cached_shard(self, shard_id: int) -> None:
        """Delete the cached files of a shard that failed its hash, never a dataset's own files.

        Only a cache (a stream with a remote other than its local folder) is touched, so the
        next run downloads the shard again instead of reading the bad copy unchecked.
        """
        stream = _internals.stream_of_shard(self, shard_id)
        if not stream.remote or os.path.realpath(stream.remote) == os.path.realpath(stream.local):
            return
        for raw_info, zip_info in _internals.shard_files(self, shard_id):
            for info in (raw_info, zip_info):
                if info is not None:
                    path = os.path.join(stream.local, stream.split or "", info.basename)
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)

    def on_exception(self, future: Any) -> None:
        """Remember a background thread's failure for ``__iter__`` (streaming only prints it)."""
        error = future.exception()
        if error is not None:
            self._thread_error = error
            _internals.stop_dataset_threads(self)

    def __iter__(self) -> Any:
        """Streaming's iteration; raises a background thread's failure instead of stopping."""
        self._thread_error: BaseException | None = None
        yield from super().__iter__()
        error = self._thread_error
        if error is not None:
            if isinstance(error, ShardError):
                raise ShardError(str(error)) from error
            raise ShardError(f"reading the dataset failed: {error}") from error

    def get_item(self, idx: int, retry: int = 7) -> dict[str, Any]:
        """Sample ``idx`` (a global index) with its image still encoded; see the class docs."""
        shard_id = _internals.shard_of_sample(self, idx)
        if shard_id not in self._checked_shards:
            self._check_shard_on_disk(shard_id)
        raw = super().get_item(idx, retry=retry)
        key = raw["key"]
        try:
            concepts = decode_concepts(raw["concepts"])
        except ValueError as err:
            raise ValueError(
                f"sample {key!r} (index {idx}) in shard {self._shard_name(idx)}: {err}"
            ) from err
        caption = self.choose_caption(idx, raw["caption"], raw.get("recaption") or "")
        sample: dict[str, Any] = {
            "key": key,
            "index": int(idx),
            "image": raw["image"],
            "caption": caption,
            "concepts": concepts,
        }
        if self.tokenizer is not None:
            sample["text"] = self.tokenizer([caption])[0]
        if self.columns:
            sample["columns"] = _column_values(raw, self.columns)
        return sample


class EncodedImages:
    """A superbatch's encoded image files packed in one ``uint8`` tensor, read as memoryviews.

    Why not a list of ``bytes``: a DataLoader worker hands its batch to the main process by
    pickling it, and at filter ratio 0.8 a superbatch carries five times the kept images' bytes
    (about 55 MB for 1,280 web JPEGs): a list is pickled, piped and unpickled, three copies and
    CPU time on both sides, for images most of which are never decoded. A tensor travels by
    shared memory instead. Built in a worker, the buffer is allocated in shared memory and
    filled once; the main process maps it without a copy, and ``images[i]`` is a zero-copy
    ``memoryview`` of image ``i`` (PIL reads it through ``io.BytesIO``).

    Deliberately not a ``Sequence``: DataLoader ``pin_memory`` and Composer's
    ``batch_to_device`` leave it alone, so encoded bytes never go to a GPU.
    """

    def __init__(self, buffer: torch.Tensor, offsets: np.ndarray) -> None:
        self.buffer = buffer
        self.offsets = offsets

    @classmethod
    def pack(cls, images: Sequence[bytes | memoryview]) -> EncodedImages:
        """Copy ``images`` into one buffer, in shared memory when called in a loader worker."""
        lengths = np.fromiter((len(b) for b in images), dtype=np.int64, count=len(images))
        offsets = np.zeros(len(images) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        total = int(offsets[-1])
        if torch.utils.data.get_worker_info() is not None:
            buffer = _internals.shared_uint8_buffer(total)  # as default_collate does
        else:
            buffer = torch.empty(total, dtype=torch.uint8)
        flat = buffer.numpy()
        for image, start, end in zip(images, offsets[:-1], offsets[1:], strict=True):
            flat[start:end] = np.frombuffer(image, dtype=np.uint8)
        return cls(buffer, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> memoryview:
        if not -len(self) <= index < len(self):
            raise IndexError(f"image {index} of {len(self)}")
        index %= len(self)
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return memoryview(self.buffer.numpy())[start:end]

    def __iter__(self) -> Any:
        view = memoryview(self.buffer.numpy())
        for start, end in zip(self.offsets[:-1].tolist(), self.offsets[1:].tolist(), strict=True):
            yield view[start:end]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, {int(self.offsets[-1])} bytes)"


class ConceptCollator:
    """Collate ``ConceptStreamingDataset`` samples into a superbatch for selection.

    The batch is a dict:

    - ``keys`` (list[str]), ``captions`` (list[str]);
    - ``sample_indices`` (``torch.int64 [n]``): every sample's global index in the dataset, when
      the samples carry an ``index`` (``ConceptStreamingDataset``'s do); world-invariant
      selection orders the global superbatch by it and the selection log records it;
    - ``image_bytes`` (:class:`EncodedImages`: ``image_bytes[i]`` is image ``i``'s encoded file
      as a ``memoryview``, all in one shared-memory buffer);
    - ``text`` (``LongTensor [n, context_length]``) when samples carry tokens, or when this
      collator was given a ``tokenizer`` (tokenizing in the loader's workers);
    - ``concept_offsets`` (``torch.int64 [n + 1]``) and ``concept_ids`` (``torch.int32 [nnz]``):
      the ragged CSR form of ``cabs_streaming.concepts``; sample ``i`` has
      ``concept_ids[concept_offsets[i]:concept_offsets[i + 1]]``;
    - ``columns`` (``dict[str, torch.float64 [n]]``): the numeric columns, in sample order, only
      when the samples carry them (``ConceptStreamingDataset(columns=[...])``); absent otherwise.

    The ragged arrays are torch tensors, not numpy, so that they survive DataLoader
    ``pin_memory``, Composer's ``batch_to_device`` and ``torch.distributed`` all-gathers as they
    are; ``.numpy()`` on CPU is zero-copy for the policy. Lists are not tensors, so Composer's
    default sample counter cannot size this batch: give the DataSpec
    ``get_num_samples_in_batch=num_samples_in_batch``.

    A class rather than a closure so it pickles into DataLoader workers.
    """

    def __init__(
        self, tokenizer: str | CaptionTokenizer | None = None, context_length: int | None = None
    ) -> None:
        self.tokenizer = _as_tokenizer(tokenizer, context_length)

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Pack ``samples``; per-sample Python work is list building only."""
        captions = [s["caption"] for s in samples]
        offsets, ids = ragged_from_lists([s["concepts"] for s in samples])
        batch: dict[str, Any] = {
            "keys": [s["key"] for s in samples],
            "image_bytes": EncodedImages.pack([s["image"] for s in samples]),
            "captions": captions,
            "concept_offsets": torch.from_numpy(offsets),
            "concept_ids": torch.from_numpy(ids),
        }
        if samples and "index" in samples[0]:
            batch["sample_indices"] = torch.tensor([s["index"] for s in samples], dtype=torch.int64)
        if samples and "columns" in samples[0]:
            batch["columns"] = {
                name: torch.tensor([s["columns"][name] for s in samples], dtype=torch.float64)
                for name in samples[0]["columns"]
            }
        if samples and "text" in samples[0]:
            batch["text"] = torch.stack([s["text"] for s in samples])
        elif self.tokenizer is not None:
            batch["text"] = self.tokenizer(captions)
        return batch

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tokenizer={self.tokenizer!r})"


#: Collate without tokenizing in the collator (tokens, if any, come from the dataset).
collate_concepts = ConceptCollator()


def num_samples_in_batch(batch: dict[str, Any]) -> int:
    """Superbatch size of a collated batch, for Composer's ``DataSpec.get_num_samples_in_batch``."""
    return len(batch["keys"])


class _Lookahead:
    """An iterator that can hold back one item, so the next batch can be seen before its turn."""

    _EMPTY = object()

    def __init__(self, inner: Iterator[Any]) -> None:
        self._inner = inner
        self._held: Any = self._EMPTY
        self._done = False

    def __iter__(self) -> _Lookahead:
        return self

    def __next__(self) -> Any:
        if self._held is not self._EMPTY:
            item, self._held = self._held, self._EMPTY
            return item
        if self._done:
            raise StopIteration
        return next(self._inner)

    def peek(self) -> Any | None:
        """The item the next ``next()`` returns, or None at the end; it stays to be returned."""
        if self._held is self._EMPTY and not self._done:
            try:
                self._held = next(self._inner)
            except StopIteration:
                self._done = True
        return None if self._held is self._EMPTY else self._held


class LookaheadDataLoader(DataLoader):
    """A ``DataLoader`` whose current epoch's next batch can be looked at before it is due.

    ``ConceptAwareBatchSampling`` uses :meth:`peek` at step ``t`` to select step ``t + 1``'s
    samples and decode them in the background while the model trains on step ``t`` (on a GPU
    the CPU is otherwise idle then). Batches come out unchanged and in the same order, and
    Composer still counts each one when it is due, so resume positions are unaffected.
    """

    _ahead: _Lookahead | None = None

    def __iter__(self) -> _Lookahead:  # type: ignore[override]
        self._ahead = _Lookahead(super().__iter__())
        return self._ahead

    def peek(self) -> Any | None:
        """The batch the current iteration yields next, or None (no iteration, or its end)."""
        return None if self._ahead is None else self._ahead.peek()
