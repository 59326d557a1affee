"""Concept-Aware Batch Sampling as a Composer ``Algorithm``, and the functions of one CABS step.

At ``Event.AFTER_DATALOADER`` the superbatch from ``ConceptCollator`` is on every rank. One CABS
step all-gathers the ragged concept ids (sizes first, then a padded payload; gloo and NCCL), runs
the selection policy (a pure function of the global ids, the seed and the step,
``cabs_streaming.selection``), keeps this rank's share, decodes, augments and tokenizes ONLY the
kept samples and hands over the kept batch ``{"images", "text", "keys"}``
(docs/design.md#deferred-decoding). With a :class:`Lookahead` and the loader's next batch the
work for step ``t + 1`` starts during step ``t`` (selection on the calling thread, decoding on a
background thread), so decoding overlaps the model step as it does in plain training's loader
workers; the batches are the same (docs/design.md#lookahead).

With ``world_invariant`` the policy keeps ``world * k`` of the global superbatch ordered by
global sample index, the kept samples are dealt to ranks, and those that change rank are moved
by :func:`exchange_kept` (one ``all_to_all``), so every world size trains on the same global
batches (docs/selection.md#world-invariant-selection).

Composer counted the batch's samples before this event fired, so the sample counter and the
dataset's resume position stay those of the superbatch that was drawn, while the model trains on
the kept part (docs/design.md#the-drawn-count). Selection lives here and never in
``DataSpec.batch_transforms``, which runs before the count.

As in Composer's own algorithms, the module-level functions hold the logic and work without a
``Trainer``: :func:`select_superbatch` (the collective half), :func:`decode_kept` (the
thread-safe half), :func:`replace_undecodable`, :func:`finish_kept_batch`, :func:`kept_batch`
(both halves for one rank's indices) and :func:`cabs_step` (a whole step, lookahead included:
what the benchmarks call). :class:`ConceptAwareBatchSampling` only holds the hyper-parameters,
matches the event, calls :func:`cabs_step` in ``apply`` and logs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from composer.core import Algorithm, Event, State, TimeUnit
from composer.loggers import Logger
from composer.utils import dist

from cabs_streaming.choices import DECODE_ERROR_MODES
from cabs_streaming.dataset import CaptionTokenizer, LookaheadDataLoader
from cabs_streaming.decode import DecodedImage, ImageDecodeError, ImageDecoder
from cabs_streaming.selection import (
    SelectionPolicy,
    SelectionResult,
    get_policy,
    invariant_stand_ins,
    select,
    select_invariant,
    stand_ins,
)
from cabs_streaming.selection.sizes import check_filter_ratio, keep_per_rank

__all__ = [
    "CabsStep",
    "ConceptAwareBatchSampling",
    "KeptBatch",
    "Lookahead",
    "Replacement",
    "SelectionRecord",
    "append_selection_log",
    "cabs_step",
    "decode_kept",
    "exchange_kept",
    "finish_kept_batch",
    "gather_concepts",
    "gather_sample_meta",
    "kept_batch",
    "replace_undecodable",
    "select_superbatch",
    "selection_digest",
    "verify_consensus",
]

log = logging.getLogger(__name__)

#: Keys ``ConceptCollator`` produces that selection needs.
REQUIRED_KEYS = ("keys", "image_bytes", "concept_offsets", "concept_ids")


def is_superbatch(batch: Any) -> bool:
    """Whether ``batch`` is a ``ConceptCollator`` superbatch (has what selection needs)."""
    return isinstance(batch, Mapping) and all(key in batch for key in REQUIRED_KEYS)


def require_superbatch(batch: Any) -> Mapping[str, Any]:
    """``batch``, or a ``TypeError`` saying which loader the algorithm needs."""
    if not is_superbatch(batch):
        found = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise TypeError(
            "ConceptAwareBatchSampling needs batches from cabs_streaming.dataset."
            f"ConceptCollator (a dict with {list(REQUIRED_KEYS)}); got {found}"
        )
    return batch


# ------------------------------------------------------------------------------ the selection


def gather_concepts(
    offsets: torch.Tensor, ids: torch.Tensor, device: torch.device | str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """All-gather every rank's ragged concept ids into the global, rank-major CSR arrays.

    Sends per-sample lengths (int32) and the ids (int32, 4 bytes per instance), padded to the
    largest rank's payload after a first exchange of sizes, so it works with ``all_gather`` on
    gloo and NCCL alike (NCCL needs ``device`` to be this rank's GPU). With one process nothing
    is sent. Every rank must hold the same number of samples; a rank that does not is a loader
    misconfiguration (``drop_last=False``) and raises.
    """
    offsets_np = offsets.detach().cpu().numpy().astype(np.int64, copy=False)
    ids_np = ids.detach().cpu().numpy().astype(np.int32, copy=False)
    world = dist.get_world_size()
    if world == 1:
        return offsets_np, ids_np
    n = offsets_np.shape[0] - 1
    sizes = torch.tensor([n, ids_np.shape[0]], dtype=torch.int64, device=device)
    all_sizes = torch.stack(list(dist.all_gather(sizes))).cpu().numpy()
    if np.any(all_sizes[:, 0] != n):
        raise RuntimeError(
            f"ranks hold different superbatch sizes {all_sizes[:, 0].tolist()}: every rank must "
            "draw the same number of samples (DataLoader drop_last=True and the dataset's "
            "batch_size equal to the DataLoader's)"
        )
    longest = int(all_sizes[:, 1].max())
    lengths = torch.from_numpy(np.diff(offsets_np).astype(np.int32)).to(device)
    payload = torch.zeros(longest, dtype=torch.int32, device=device)
    payload[: ids_np.shape[0]] = torch.from_numpy(ids_np).to(device)
    all_lengths = [t.cpu().numpy() for t in dist.all_gather(lengths)]
    all_payloads = [t.cpu().numpy() for t in dist.all_gather(payload)]
    global_lengths = np.concatenate(all_lengths).astype(np.int64)
    global_offsets = np.zeros(world * n + 1, dtype=np.int64)
    np.cumsum(global_lengths, out=global_offsets[1:])
    global_ids = np.concatenate(
        [p[: int(size)] for p, size in zip(all_payloads, all_sizes[:, 1], strict=True)]
    )
    return global_offsets, global_ids


def gather_columns(
    batch: Mapping[str, Any], names: Sequence[str], device: torch.device | str = "cpu"
) -> dict[str, np.ndarray]:
    """All-gather the numeric per-sample columns ``names`` into global rank-major float64 arrays.

    What ``selection.filters`` read; ``batch["columns"]`` comes from ``ConceptCollator`` when the
    dataset was asked to carry them (``ConceptStreamingDataset(columns=...)``). One
    ``all_gather`` of a ``float64 [n, len(names)]`` tensor; nothing when no column is needed.
    """
    if not names:
        return {}
    carried = batch.get("columns") or {}
    missing = [name for name in names if name not in carried]
    if missing:
        raise ValueError(
            f"the selection needs the per-sample column(s) {missing}, which the superbatch does "
            f"not carry (it has {sorted(carried) or 'none'}): build the dataset with "
            f"ConceptStreamingDataset(columns={list(names)!r}) (the trainer does for "
            "selection.filters)"
        )
    n = len(batch["keys"])
    table = np.empty((n, len(names)), dtype=np.float64)
    for j, name in enumerate(names):
        table[:, j] = torch.as_tensor(carried[name]).detach().cpu().numpy()
    if dist.get_world_size() > 1:
        mine = torch.from_numpy(table).to(device)
        table = np.concatenate([t.cpu().numpy() for t in dist.all_gather(mine)])
    return {name: np.ascontiguousarray(table[:, j]) for j, name in enumerate(names)}


#: Columns of the per-sample metadata world-invariant selection all-gathers.
META_INDEX, META_IMAGE, META_CAPTION, META_KEY = range(4)


def sample_meta(batch: Mapping[str, Any]) -> np.ndarray:
    """The rank's ``int64 [n, 4]``: global sample index and byte lengths of image, caption, key.

    What every rank needs to order the global superbatch canonically and to size the exchange
    of the samples that change rank (:func:`exchange_kept`).
    """
    if "sample_indices" not in batch:
        raise ValueError(
            "world-invariant selection needs every sample's global index: the batch has no "
            "'sample_indices' (ConceptCollator adds them for samples of ConceptStreamingDataset, "
            "which carry an 'index')"
        )
    indices = torch.as_tensor(batch["sample_indices"]).cpu().numpy().astype(np.int64)
    meta = np.empty((len(batch["keys"]), 4), dtype=np.int64)
    meta[:, META_INDEX] = indices
    meta[:, META_IMAGE] = np.diff(batch["image_bytes"].offsets)
    meta[:, META_CAPTION] = [len(c.encode("utf-8")) for c in batch["captions"]]
    meta[:, META_KEY] = [len(k.encode("utf-8")) for k in batch["keys"]]
    return meta


def gather_sample_meta(meta: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """All-gather every rank's :func:`sample_meta` into the rank-major ``int64 [world * n, 4]``.

    Ranks hold equal superbatches (:func:`gather_concepts` checks), so one ``all_gather`` of
    equal shapes does, on gloo and NCCL alike.
    """
    if dist.get_world_size() == 1:
        return meta
    mine = torch.from_numpy(np.ascontiguousarray(meta)).to(device)
    return np.concatenate([t.cpu().numpy() for t in dist.all_gather(mine)])


def selection_digest(kept: np.ndarray) -> int:
    """A 63-bit digest of a selection, cheap to all-gather and compare across ranks."""
    raw = hashlib.blake2b(np.ascontiguousarray(kept, dtype=np.int64).tobytes(), digest_size=8)
    return int.from_bytes(raw.digest(), "little") >> 1


def verify_consensus(kept: np.ndarray, step: int, device: torch.device | str = "cpu") -> None:
    """Raise if any rank computed a different global selection for ``step``.

    Ranks must agree because each keeps its row of one global answer; disagreement means the
    ranks saw different inputs or configurations, and training on would silently skew batches.
    """
    if dist.get_world_size() == 1:
        return
    mine = torch.tensor([selection_digest(kept)], dtype=torch.int64, device=device)
    digests = [int(t.item()) for t in dist.all_gather(mine)]
    if len(set(digests)) > 1:
        groups: dict[int, list[int]] = {}
        for rank, digest in enumerate(digests):
            groups.setdefault(digest, []).append(rank)
        raise RuntimeError(
            f"ranks disagree on the CABS selection at step {step}: groups of ranks "
            f"{sorted(groups.values())} computed different answers. Every rank must run the same "
            "policy, options, seed and code version on the same all-gathered concept ids."
        )


@dataclass(frozen=True)
class SelectionRecord:
    """One step's selection, for the kept batch's stand-ins and for monitoring callbacks.

    ``offsets``/``ids`` are the global superbatch's concept lists (rank-major CSR); ``kept`` is
    ``int64 [world, k]`` local indices per rank; ``per_rank`` the superbatch size per rank.
    ``policy``, ``seed`` and ``num_concepts`` are what it was selected with.

    World-invariant selection (``meta`` is set: the gathered :func:`sample_meta`) has no local
    indices: ``kept`` then holds, for every rank, the positions in the gathered superbatch it
    trains on, some of them loaded by another rank (``cabs_streaming.selection.invariant``);
    ``moved`` counts those samples and ``moved_bytes`` the bytes sent for them.
    """

    step: int
    offsets: np.ndarray
    ids: np.ndarray
    kept: np.ndarray
    per_rank: int
    result: SelectionResult
    policy: SelectionPolicy | None = None
    seed: int = 0
    num_concepts: int | None = None
    meta: np.ndarray | None = None
    moved: int = 0
    moved_bytes: int = 0
    columns: Mapping[str, np.ndarray] | None = None
    """The gathered numeric columns the policy's filters read (rank-major)."""

    @property
    def world_invariant(self) -> bool:
        """Whether this is a world-invariant selection (``kept`` holds gathered positions)."""
        return self.meta is not None

    @property
    def sample_indices(self) -> np.ndarray | None:
        """Global sample index of every gathered position (world-invariant selection only)."""
        return None if self.meta is None else self.meta[:, META_INDEX]

    @property
    def kept_global(self) -> np.ndarray:
        """Kept samples as positions in the gathered superbatch, ``int64 [world * k]``."""
        if self.world_invariant:
            return self.kept.ravel()
        starts = np.arange(self.kept.shape[0], dtype=np.int64)[:, None] * self.per_rank
        return (self.kept + starts).ravel()

    def stand_ins(self, rank: int) -> np.ndarray:
        """Rank ``rank``'s unkept local indices in the policy's order of preference.

        What replaces a kept image that cannot be decoded (docs/selection.md#stand-ins).
        """
        if self.policy is None:
            raise ValueError("this record does not name its policy: it has no stand-in order")
        world = self.kept.shape[0]
        if self.world_invariant:
            return invariant_stand_ins(
                self.policy, self.offsets, self.ids, self.sample_indices, world, self.kept, rank,
                self.seed, self.step, self.num_concepts, self.columns,
            )
        return stand_ins(
            self.policy, self.offsets, self.ids, world, self.kept, rank, self.seed, self.step,
            self.num_concepts, self.columns,
        )


def select_superbatch(
    batch: Mapping[str, Any],
    step: int,
    *,
    policy: SelectionPolicy,
    filter_ratio: float,
    seed: int,
    num_concepts: int | None = None,
    verify: bool = True,
    device: torch.device | str = "cpu",
    world_invariant: bool = False,
) -> SelectionRecord:
    """The collective half of a step: gather every rank's ids, select, check the ranks agree.

    Runs on the thread that owns the collectives, in the same order on every rank. Keeps
    ``superbatch * (1 - filter_ratio)`` per rank, a whole number (docs/selection.md).
    ``world_invariant`` selects ``world * k`` from the canonically ordered global superbatch
    and assigns ``k`` to each rank (:func:`cabs_streaming.selection.select_invariant`); the
    samples that change rank are then moved by :func:`exchange_kept`.
    """
    n = len(batch["keys"])
    k = keep_per_rank(n, filter_ratio)
    world = dist.get_world_size()
    meta = gather_sample_meta(sample_meta(batch), device) if world_invariant else None
    offsets, ids = gather_concepts(batch["concept_offsets"], batch["concept_ids"], device)
    columns = gather_columns(batch, policy.required_columns(), device)
    if meta is None:
        result = select(
            policy, offsets, ids, world=world, k=k, seed=seed, step=step,
            num_concepts=num_concepts, columns=columns,
        )
        kept, moved, moved_bytes = result.kept, 0, 0
    else:
        chosen = select_invariant(
            policy, offsets, ids, meta[:, META_INDEX], world=world, k=k, seed=seed, step=step,
            num_concepts=num_concepts, columns=columns,
        )
        result, kept, moved = chosen.result, chosen.sources, chosen.moved
        changes = kept // n != np.arange(world)[:, None]
        moved_bytes = int(_payload_sizes(meta, _token_bytes(batch))[kept[changes]].sum())
    if verify:
        verify_consensus(kept, step, device)
    return SelectionRecord(
        step, offsets, ids, kept, n, result, policy, seed, num_concepts, meta, moved, moved_bytes,
        columns or None,
    )


# ------------------------------------------------------------------ moving kept samples


def _token_bytes(batch: Mapping[str, Any]) -> int:
    """Bytes of one sample's caption tokens when the loader tokenized (0 otherwise)."""
    text = batch.get("text")
    return 0 if text is None else int(text.shape[1]) * text.element_size()


def _payload_sizes(meta: np.ndarray, token_bytes: int) -> np.ndarray:
    """Bytes :func:`exchange_kept` sends for each gathered sample: key, caption, image, tokens."""
    return meta[:, META_KEY] + meta[:, META_CAPTION] + meta[:, META_IMAGE] + token_bytes


class JoinedImages:
    """A rank's :class:`~cabs_streaming.dataset.EncodedImages` followed by received images.

    Indexable like the superbatch's ``image_bytes`` (``images[i]`` is a ``memoryview``), without
    copying the superbatch's buffer.
    """

    def __init__(self, own: Any, received: Sequence[memoryview]) -> None:
        self.own = own
        self.received = list(received)

    def __len__(self) -> int:
        return len(self.own) + len(self.received)

    def __getitem__(self, index: int) -> memoryview:
        if index < len(self.own):
            return self.own[index]
        return self.received[index - len(self.own)]


def _pack(batch: Mapping[str, Any], local: Sequence[int]) -> torch.Tensor:
    """The payloads of this rank's samples ``local``, back to back: key, caption, image, tokens."""
    chunks: list[bytes] = []
    for i in local:
        chunks.append(batch["keys"][i].encode("utf-8"))
        chunks.append(batch["captions"][i].encode("utf-8"))
        chunks.append(bytes(batch["image_bytes"][i]))
        if "text" in batch:
            chunks.append(batch["text"][i].cpu().numpy().tobytes())
    return torch.frombuffer(bytearray(b"".join(chunks)) or bytearray(1), dtype=torch.uint8)


def _unpack(
    raw: memoryview, meta: np.ndarray, text: torch.Tensor | None, token_bytes: int
) -> tuple[list[str], list[str], list[memoryview], list[torch.Tensor]]:
    """Split received payloads (sizes from the senders' ``meta`` rows) as :func:`_pack` built them.

    ``text`` is this rank's token tensor when the loader tokenized (its row shape and dtype are
    every rank's), else None; ``token_bytes`` is :func:`_token_bytes` of the batch.
    """
    keys, captions, images, tokens = [], [], [], []
    cursor = 0
    for lengths in meta:
        parts = []
        for length in (lengths[META_KEY], lengths[META_CAPTION], lengths[META_IMAGE], token_bytes):
            parts.append(raw[cursor : cursor + int(length)])
            cursor += int(length)
        keys.append(bytes(parts[0]).decode("utf-8"))
        captions.append(bytes(parts[1]).decode("utf-8"))
        images.append(parts[2])
        if text is not None:
            row = np.frombuffer(parts[3], dtype=text.cpu().numpy().dtype)
            tokens.append(torch.from_numpy(row.copy()))
    return keys, captions, images, tokens


def exchange_kept(
    batch: Mapping[str, Any], record: SelectionRecord, device: torch.device | str = "cpu"
) -> tuple[dict[str, Any], np.ndarray]:
    """Move the kept samples that change rank; returns this rank's batch and kept indices.

    After a world-invariant selection every rank knows the whole assignment (``record.kept``
    holds gathered positions) and every sample's byte sizes (``record.meta``), so one
    ``all_to_all_single`` of ``uint8`` tensors (gloo and NCCL; on NCCL via ``device``) sends
    each moved sample's key, caption, encoded image and, when the loader tokenized, tokens
    straight to its new rank; nobody receives what it does not train on. Concept ids are not
    sent: every rank has all of them from :func:`gather_concepts`. When no sample moves, or
    with one process, nothing is sent (every rank sees that alike).

    The returned batch is this rank's superbatch with the received samples appended (images
    as :class:`JoinedImages`), and the indices are this rank's kept samples in it, in the
    order of ``record.kept[rank]``, ready for :func:`decode_kept`. Stand-ins stay this rank's
    own unkept samples (indices below the superbatch size).
    """
    if not record.world_invariant:
        raise ValueError("exchange_kept needs a world-invariant SelectionRecord")
    assert record.meta is not None
    world, rank, n = record.kept.shape[0], dist.get_global_rank(), record.per_rank
    token_bytes = _token_bytes(batch)
    sizes = _payload_sizes(record.meta, token_bytes)
    owner = record.kept // n
    mine = record.kept[rank]
    local = np.where(owner[rank] == rank, mine - rank * n, -1)
    if record.moved == 0:
        return dict(batch), local
    sends = [
        [] if dest == rank else record.kept[dest][owner[dest] == rank].tolist()
        for dest in range(world)
    ]
    send = _pack(batch, [p - rank * n for positions in sends for p in positions])
    send_sizes = [int(sizes[positions].sum()) for positions in sends]
    receives = [
        [] if source == rank else mine[owner[rank] == source].tolist() for source in range(world)
    ]
    receive_sizes = [int(sizes[positions].sum()) for positions in receives]
    received = torch.empty(max(sum(receive_sizes), 1), dtype=torch.uint8, device=device)
    torch.distributed.all_to_all_single(
        received[: sum(receive_sizes)],
        send[: sum(send_sizes)].to(device),
        output_split_sizes=receive_sizes,
        input_split_sizes=send_sizes,
    )
    order = [p for positions in receives for p in positions]
    keys, captions, images, tokens = _unpack(
        memoryview(received.cpu().numpy()), record.meta[order], batch.get("text"), token_bytes
    )
    where = {position: n + i for i, position in enumerate(order)}
    joined = dict(batch)
    joined["keys"] = list(batch["keys"]) + keys
    joined["captions"] = list(batch["captions"]) + captions
    joined["image_bytes"] = JoinedImages(batch["image_bytes"], images)
    own_indices = torch.as_tensor(batch["sample_indices"])
    joined["sample_indices"] = torch.cat(
        [own_indices.cpu(), torch.from_numpy(record.meta[order, META_INDEX].copy())]
    )
    if tokens:
        joined["text"] = torch.cat([batch["text"].cpu(), torch.stack(tokens)])
    local = np.array(
        [i if i >= 0 else where[int(p)] for i, p in zip(local.tolist(), mine, strict=True)],
        dtype=np.int64,
    )
    return joined, local


# ---------------------------------------------------------------------------- the kept batch


class Replacement(NamedTuple):
    """A kept image that did not decode, and the unkept sample trained on in its slot."""

    step: int
    rank: int
    failed: str
    stand_in: str
    cause: str


@dataclass
class KeptBatch:
    """A kept batch as :func:`decode_kept` leaves it, before :func:`finish_kept_batch`.

    ``batch`` is ``{"images", "text", "keys"}``; its ``images`` is None on a GPU, where
    ``decoded`` holds the ``uint8`` images for ``ImageDecoder.to_tensor``.
    """

    batch: dict[str, Any]
    decoded: list[Any]
    replacements: list[Replacement] = field(default_factory=list)
    indices: list[int] | None = None
    """The trained samples' global indices, when the superbatch carries ``sample_indices``."""


def decode_kept(
    batch: Mapping[str, Any],
    kept: np.ndarray,
    step: int,
    rank: int,
    *,
    decoder: ImageDecoder,
    tokenizer: CaptionTokenizer | None = None,
    stand_ins: Callable[[], np.ndarray] | None = None,
    on_decode_error: str = "raise",
    crop_keys: Sequence[int] | None = None,
) -> KeptBatch:
    """Decode, augment and tokenize this rank's kept samples ``kept`` (local indices).

    Thread-safe: it touches no shared state, so it may run on a background thread while the
    model trains. The train crop of slot ``i`` is seeded by ``(decoder.seed, step, rank, i)``,
    or, with ``crop_keys`` (world-invariant selection passes the global sample indices), by
    ``(decoder.seed, step, crop_keys[i], 0)``: then a sample's crop does not depend on which
    rank or slot it lands in, and neither does the global batch the model sees.
    A kept image that does not decode raises an ``ImageDecodeError`` naming the sample
    (``on_decode_error="raise"``) or is replaced by the first decodable of ``stand_ins()``
    (``"replace"``; see :func:`replace_undecodable`). Captions are tokenized only for the kept
    samples (with ``tokenizer``), unless the loader already did.
    """
    index = kept.tolist()
    out = decoder.output_buffer(len(index))
    decoded = decoder.decode_pixels(
        [batch["image_bytes"][i] for i in index], [batch["keys"][i] for i in index],
        step=step, rank=rank, errors="return", out=out, crop_keys=crop_keys,
    )  # fmt: skip
    failed = [slot for slot, d in enumerate(decoded) if isinstance(d, ImageDecodeError)]
    replaced: list[Replacement] = []
    if failed:
        first = decoded[failed[0]]
        if on_decode_error == "raise" or stand_ins is None:
            raise ImageDecodeError(
                first.key,
                f"{first.cause} (training step {step}, rank {rank}; with decode.on_error="
                "replace the rank's next unkept sample would be trained on instead)",
            )
        replaced = replace_undecodable(
            batch, index, decoded, failed, step, rank,
            decoder=decoder, candidates=stand_ins().tolist(), out=out,
        )
    text = _kept_tokens(batch, index, tokenizer)
    keys = [batch["keys"][i] for i in index]
    indices = None
    if "sample_indices" in batch:
        indices = torch.as_tensor(batch["sample_indices"])[index].tolist()
    return KeptBatch({"images": out, "text": text, "keys": keys}, decoded, replaced, indices)


def replace_undecodable(
    batch: Mapping[str, Any],
    index: list[int],
    decoded: list[Any],
    failed: list[int],
    step: int,
    rank: int,
    *,
    decoder: ImageDecoder,
    candidates: Sequence[int],
    out: torch.Tensor | None,
) -> list[Replacement]:
    """Fill the ``failed`` slots of ``index``/``decoded`` in place from ``candidates``, in order.

    Each slot takes the first remaining candidate whose image decodes, with the failed slot's
    augmentation seed (and its row of ``out``); a candidate that fails too is logged and passed
    over. No candidate left is an ``ImageDecodeError`` naming the failed sample.
    """
    replaced = []
    remaining = iter(candidates)
    for slot in failed:
        bad_key = batch["keys"][index[slot]]
        for candidate in remaining:
            key = batch["keys"][candidate]
            result = decoder.decode_or_error(
                batch["image_bytes"][candidate], key, step=step, rank=rank, index=slot,
                row=None if out is None else out[slot],
            )
            if isinstance(result, DecodedImage):
                break
            log.warning("stand-in %r cannot be decoded either: %s", key, result)
        else:
            raise ImageDecodeError(
                bad_key,
                f"{decoded[slot].cause}; and no unkept sample of rank {rank} at step {step} "
                "decodes to replace it",
            )
        replaced.append(Replacement(step, rank, bad_key, key, str(decoded[slot].cause)))
        index[slot] = candidate
        decoded[slot] = result
    return replaced


def _kept_tokens(
    batch: Mapping[str, Any], index: list[int], tokenizer: CaptionTokenizer | None
) -> torch.Tensor:
    """The kept samples' tokens: the loader's when it tokenized, else ``tokenizer``'s."""
    if "text" in batch:
        return batch["text"][torch.as_tensor(index, dtype=torch.long)]
    if tokenizer is not None:
        return tokenizer([batch["captions"][i] for i in index])
    raise ValueError(
        "the batch has no 'text' tokens and the algorithm has no tokenizer: give the dataset a "
        "tokenizer, or ConceptAwareBatchSampling(tokenizer=...) to tokenize only the kept "
        "captions"
    )


def finish_kept_batch(kept: KeptBatch, decoder: ImageDecoder) -> dict[str, Any]:
    """The model's batch from a :class:`KeptBatch`, on the calling thread, when it is trained on.

    Puts the images on the device where :func:`decode_kept` left that to the caller, and warns
    about each replacement (never for work that is dropped).
    """
    out = dict(kept.batch)
    if out["images"] is None:
        out["images"] = decoder.to_tensor(kept.decoded)
    for step, rank, bad_key, key, cause in kept.replacements:
        log.warning(
            "step %d, rank %d: the image of kept sample %r cannot be decoded (%s); training "
            "on %r instead (decode.on_error=replace)",
            step, rank, bad_key, cause, key,
        )
    return out


def kept_batch(
    batch: Mapping[str, Any],
    kept: np.ndarray,
    step: int,
    rank: int,
    *,
    decoder: ImageDecoder,
    tokenizer: CaptionTokenizer | None = None,
    stand_ins: Callable[[], np.ndarray] | None = None,
    on_decode_error: str = "raise",
) -> tuple[dict[str, Any], list[Replacement]]:
    """The model's batch from this rank's kept local indices, and the replacements made.

    :func:`decode_kept` then :func:`finish_kept_batch`, for callers without a background thread.
    """
    built = decode_kept(
        batch, kept, step, rank, decoder=decoder, tokenizer=tokenizer, stand_ins=stand_ins,
        on_decode_error=on_decode_error,
    )
    return finish_kept_batch(built, decoder), built.replacements


# --------------------------------------------------------------------------------- lookahead


@dataclass
class _Prepared:
    """One step's selection, and its kept batch: built already, or being built in the background."""

    step: int
    keys: list[str]  # the superbatch's keys: what it was built from
    record: SelectionRecord
    done: KeptBatch | None = None
    future: Future | None = None

    def collect(self) -> KeptBatch:
        """The kept batch; waits for the background work, re-raising its error."""
        if self.future is not None:
            return self.future.result()
        assert self.done is not None
        return self.done

    def discard(self) -> None:
        """Drop work nobody will train on (its errors included), once it has stopped."""
        if self.future is not None and not self.future.cancel():
            self.future.exception()  # waits; the error, if any, concerns no trained sample


class Lookahead:
    """One step prepared ahead of its turn: its selection done, its decoding on a thread.

    Selection and decoding are pure functions of the samples and the step, so a step taken from
    here is the very same kept batch it would have been when due.
    """

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._pending: _Prepared | None = None

    def start(
        self, step: int, keys: Sequence[str], record: SelectionRecord, work: Callable[[], Any]
    ) -> None:
        """Run ``work`` (building step ``step``'s kept batch) on the background thread."""
        self.drop()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="cabs-lookahead")
        self._pending = _Prepared(step, list(keys), record, future=self._executor.submit(work))

    def take(self, step: int, keys: Sequence[str]) -> _Prepared | None:
        """The step prepared from these ``keys`` at ``step``, or None (anything else is dropped)."""
        pending, self._pending = self._pending, None
        if pending is not None and pending.step == step and pending.keys == list(keys):
            return pending
        if pending is not None:
            pending.discard()
        return None

    def drop(self) -> None:
        """Forget the step being prepared (waiting for its thread first)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.discard()


def _upcoming_superbatch(peek: Callable[[], Any] | None, device: torch.device | str) -> Any:
    """The loader's next superbatch when every rank has one, else None (on every rank alike).

    Every rank must take part in the next selection's collectives, or none.
    """
    upcoming = peek() if peek is not None else None
    usable = is_superbatch(upcoming)
    if dist.get_world_size() > 1:
        flag = torch.tensor([1 if usable else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, reduce_operation="MIN")
        usable = bool(flag.item())
    return upcoming if usable else None


# --------------------------------------------------------------------------------- one step


@dataclass
class CabsStep:
    """What one CABS step produced: the model's batch and how it was chosen."""

    batch: dict[str, Any]
    """``{"images": float [k, 3, H, W], "text": int64 [k, L], "keys": list[str]}``."""
    record: SelectionRecord
    replacements: list[Replacement]
    looked_ahead: bool
    """Whether the kept batch was built in the background during the step before."""
    indices: list[int] | None = None
    """The global sample indices of ``batch["keys"]``, when the loader carries them."""


def cabs_step(
    batch: Mapping[str, Any],
    step: int,
    *,
    policy: SelectionPolicy,
    filter_ratio: float,
    seed: int,
    decoder: ImageDecoder,
    tokenizer: CaptionTokenizer | None = None,
    num_concepts: int | None = None,
    on_decode_error: str = "raise",
    verify: bool = True,
    device: torch.device | str = "cpu",
    lookahead: Lookahead | None = None,
    peek: Callable[[], Any] | None = None,
    world_invariant: bool = False,
) -> CabsStep:
    """One CABS step on this rank's superbatch ``batch``: select, then decode only the kept.

    The functional form of :class:`ConceptAwareBatchSampling` (its ``apply`` calls this), usable
    without a ``Trainer``. With a ``lookahead``, step ``step`` is taken from it when it was
    prepared during the step before, and ``peek()`` (the loader's next batch, e.g.
    ``LookaheadDataLoader.peek``) is prepared as step ``step + 1``: selected now, decoded on the
    lookahead's thread. Every rank must call it with the same arguments but its own batch.
    ``world_invariant`` keeps the same global set on any number of ranks and moves the samples
    that change rank before decoding (:func:`select_superbatch`, :func:`exchange_kept`).
    """
    batch = require_superbatch(batch)
    rank = dist.get_global_rank()

    def prepare(superbatch: Mapping[str, Any], at: int) -> tuple[SelectionRecord, Callable]:
        record = select_superbatch(
            superbatch, at, policy=policy, filter_ratio=filter_ratio, seed=seed,
            num_concepts=num_concepts, verify=verify, device=device,
            world_invariant=world_invariant,
        )
        if record.world_invariant:
            mine, kept = exchange_kept(superbatch, record, device)  # a collective: on this thread
        else:
            mine, kept = superbatch, record.kept[rank]

        crop_keys = None
        if record.world_invariant:  # crops follow the sample, not its rank and slot
            crop_keys = torch.as_tensor(mine["sample_indices"])[kept].tolist()

        def work() -> KeptBatch:
            return decode_kept(
                mine, kept, at, rank, decoder=decoder, tokenizer=tokenizer,
                stand_ins=lambda: record.stand_ins(rank), on_decode_error=on_decode_error,
                crop_keys=crop_keys,
            )

        return record, work

    prepared = lookahead.take(step, batch["keys"]) if lookahead is not None else None
    if prepared is None:
        record, work = prepare(batch, step)
        prepared = _Prepared(step, list(batch["keys"]), record, done=work())
    built = prepared.collect()
    out = finish_kept_batch(built, decoder)
    if lookahead is not None:
        upcoming = _upcoming_superbatch(peek, device)
        if upcoming is not None:
            lookahead.start(step + 1, upcoming["keys"], *prepare(upcoming, step + 1))
    return CabsStep(
        out, prepared.record, built.replacements, prepared.future is not None, built.indices
    )


def append_selection_log(
    path: str,
    step: int,
    kept_keys: Sequence[str],
    replaced: Sequence[tuple[str, str]],
    indices: Sequence[int] | None = None,
) -> None:
    """Rank 0 appends ``{"step", "keys": [[rank 0's kept keys], ...], "indices"?, "replaced"?}``.

    A collective: every rank calls it with its own kept keys, their global sample ``indices``
    (when the loader carries them; logged as ``"indices"``, one list per rank like ``"keys"``)
    and ``(failed, stand-in)`` pairs.
    """
    pairs = [list(r) for r in replaced]
    every_rank = dist.all_gather_object(
        (list(kept_keys), pairs, None if indices is None else list(indices))
    )
    if dist.get_global_rank() != 0:
        return
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    record: dict[str, Any] = {"step": step, "keys": [keys for keys, _, _ in every_rank]}
    if all(index is not None for _, _, index in every_rank):
        record["indices"] = [[int(i) for i in index] for _, _, index in every_rank]
    if any(pairs for _, pairs, _ in every_rank):
        record["replaced"] = [pairs for _, pairs, _ in every_rank]
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def run_length(state: State) -> tuple[int | None, int | None]:
    """``(steps per epoch, steps in the run)`` for schedules' ``ep`` and ``dur`` times.

    ``None`` where Composer does not know it (an unsized loader; a duration in samples or
    tokens); a schedule that needs it then says so.
    """
    per_epoch = state.dataloader_len
    batches_per_epoch = int(per_epoch) if per_epoch is not None else None
    duration = state.max_duration
    total = None
    if duration is not None:
        if duration.unit == TimeUnit.BATCH:
            total = int(duration.value)
        elif duration.unit == TimeUnit.EPOCH and batches_per_epoch is not None:
            total = int(duration.value) * batches_per_epoch
    return batches_per_epoch, total


def collective_device(state: State) -> torch.device:
    """Where collective tensors must live: the GPU under NCCL, the CPU otherwise."""
    backend = state.device.dist_backend if state.device is not None else "gloo"
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------- the algorithm


class ConceptAwareBatchSampling(Algorithm):
    """Keep the most useful ``1 - filter_ratio`` share of every superbatch, by concepts.

    Runs at ``Event.AFTER_DATALOADER`` on batches from ``ConceptCollator``: all-gathers the
    concept ids, selects with ``policy`` (``"iid"``, ``"frequency"`` = CABS-FM, ``"diversity"``
    = CABS-DM, or any registered name) using ``step = state.timestamp.batch``, keeps this rank's
    share, decodes and augments only those images with ``decoder``, and sets ``state.batch`` to
    ``{"images": float [k, 3, H, W], "text": int64 [k, L], "keys": list[str]}``
    (:func:`cabs_step`).

    Args:
        decoder: the train-time ``ImageDecoder`` (open_clip transform of the model).
        filter_ratio: share of each superbatch thrown away; the per-rank superbatch times
            ``1 - filter_ratio`` must be a whole number.
        policy: a registered selection policy name or a built ``SelectionPolicy``.
        policy_options: options of a named policy (e.g. ``{"official_compat": True}``).
        seed: the selection seed (fill order, IID draws); derive it from the run seed.
        tokenizer: tokenizes the kept captions when the loader did not (``tokenizer=None`` on the
            dataset): only the kept share is tokenized.
        verify_consensus: all-gather a digest of every selection and raise if ranks disagree.
        selection_log: rank 0 appends one JSON line per step, ``{"step", "keys": [[rank 0 kept
            keys], ...]}``: an audit trail, and what the resumption tests compare.
        num_concepts: the vocabulary size, to reject out-of-range ids early (optional).
        on_decode_error: a kept image that cannot be decoded either stops training with an
            ``ImageDecodeError`` naming the sample (``"raise"``), or is replaced by the first of
            this rank's unkept samples, in the policy's order of preference, whose image decodes
            (``"replace"``, docs/selection.md#stand-ins). Each replacement is logged as a
            warning, counted in ``cabs/decode_replaced``, kept in ``replacements`` and written
            to the selection log.
        lookahead: with a ``LookaheadDataLoader``, select step ``t + 1`` right after step
            ``t``'s batch is handed over and decode its kept images on a background thread
            while the model trains on step ``t``, as loader workers do for plain training.
            The batches are identical with and without it; it costs one superbatch of encoded
            bytes and one kept batch of memory. With other loaders it has no effect.
        log_prefix: prefix of the logged statistics.
        world_invariant: select the global batch as a function of the global superbatch's
            samples only (one quota ``world * k`` over the superbatch in global sample index
            order), then give every rank ``k`` of them, moving the fewest samples between ranks
            (their bytes go by one ``all_to_all``; ``cabs/moved_samples`` and
            ``cabs/moved_bytes`` are logged). The same kept sets on any number of ranks, so a
            run can resume on another world size (docs/selection.md#world-invariant-selection).

    Example::

        from composer import Trainer
        from cabs_streaming import ConceptAwareBatchSampling, ImageDecoder

        cabs = ConceptAwareBatchSampling(
            decoder=ImageDecoder.from_model(model.clip, is_train=True, seed=17),
            filter_ratio=0.8, policy="diversity", seed=17,
        )
        trainer = Trainer(model=model, train_dataloader=loader, algorithms=[cabs], ...)
    """

    def __init__(
        self,
        decoder: ImageDecoder,
        filter_ratio: float,
        policy: str | SelectionPolicy = "diversity",
        policy_options: Mapping[str, Any] | None = None,
        seed: int = 0,
        tokenizer: str | CaptionTokenizer | None = None,
        verify_consensus: bool = True,
        selection_log: str | os.PathLike | None = None,
        num_concepts: int | None = None,
        on_decode_error: str = "raise",
        lookahead: bool = True,
        log_prefix: str = "cabs/",
        world_invariant: bool = False,
    ) -> None:
        filter_ratio = check_filter_ratio(filter_ratio)
        if on_decode_error not in DECODE_ERROR_MODES:
            raise ValueError(
                f"on_decode_error must be one of {list(DECODE_ERROR_MODES)}, got "
                f"{on_decode_error!r}"
            )
        if isinstance(policy, str):
            policy = get_policy(policy, policy_options or {})
        elif policy_options:
            raise ValueError("policy_options only go with a policy name, not a built policy")
        self.policy = policy
        self.decoder = decoder
        self.filter_ratio = float(filter_ratio)
        self.seed = int(seed)
        self.tokenizer = CaptionTokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self.verify_consensus = verify_consensus
        self.selection_log = os.fspath(selection_log) if selection_log else None
        self.num_concepts = num_concepts
        self.on_decode_error = on_decode_error
        self.lookahead = lookahead
        self.log_prefix = log_prefix
        self.world_invariant = bool(world_invariant)
        self._ahead = Lookahead()
        #: Steps whose kept batch was built in the background during the step before.
        self.looked_ahead = 0
        #: The last selection (for monitoring callbacks).
        self.last: SelectionRecord | None = None
        #: Every image of this process replaced by a stand-in.
        self.replacements: list[Replacement] = []

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(policy={self.policy.config()!r}, "
            f"filter_ratio={self.filter_ratio}, seed={self.seed}, "
            f"world_invariant={self.world_invariant})"
        )

    def state_dict(self) -> dict[str, Any]:
        """Plain values only, identical on every rank (Composer saves rank 0's)."""
        return {
            "policy": self.policy.config(),
            "filter_ratio": self.filter_ratio,
            "seed": self.seed,
            "world_invariant": self.world_invariant,
            "world_size": dist.get_world_size(),
            "repr": repr(self),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore (selection is a pure function); warn if the config changed.

        Resuming on another number of ranks keeps the uninterrupted run's kept sets only in
        world-invariant mode; a rank-local run is warned that its batches will differ.
        """
        saved = {k: state.get(k) for k in ("policy", "filter_ratio", "seed")}
        saved["world_invariant"] = bool(state.get("world_invariant", False))
        current = {k: v for k, v in self.state_dict().items() if k in saved}
        if saved != current:
            warnings.warn(
                f"resuming with a different CABS configuration: the checkpoint used {saved}, "
                f"this run uses {current}; batches from here on follow the new configuration",
                stacklevel=2,
            )
        world, before = dist.get_world_size(), state.get("world_size")
        if before is not None and before != world and not self.world_invariant:
            warnings.warn(
                f"resuming a checkpoint of {before} rank(s) on {world}: rank-local selection "
                "keeps different samples from here on than the original run would have; set "
                "selection.world_invariant=true (from the start of a run) to keep the same "
                "global batches on any number of ranks",
                stacklevel=2,
            )

    def match(self, event: Event, state: State) -> bool:
        """Run at fit start (schedule times), after each batch is drawn and counted, at fit end."""
        return event in (Event.FIT_START, Event.AFTER_DATALOADER, Event.FIT_END)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        """Replace ``state.batch`` with the kept batch of :func:`cabs_step`, and log it.

        At ``FIT_END`` a step prepared beyond the end of training is dropped.
        """
        if event == Event.FIT_END:
            self._ahead.drop()
            return
        if event == Event.FIT_START:
            self.policy = self.policy.resolve(*run_length(state))
            return
        loader = getattr(state, "dataloader", None)
        step = int(state.timestamp.batch)
        done = cabs_step(
            state.batch, step, policy=self.policy, filter_ratio=self.filter_ratio,
            seed=self.seed, decoder=self.decoder, tokenizer=self.tokenizer,
            num_concepts=self.num_concepts, on_decode_error=self.on_decode_error,
            verify=self.verify_consensus, device=collective_device(state),
            lookahead=self._ahead if self.lookahead else None,
            peek=loader.peek if isinstance(loader, LookaheadDataLoader) else None,
            world_invariant=self.world_invariant,
        )
        state.batch = done.batch
        self.last = done.record
        self.looked_ahead += done.looked_ahead
        self.replacements += done.replacements
        metrics = done.record.result.stats.as_dict(self.log_prefix)
        metrics[f"{self.log_prefix}decode_replaced"] = float(len(done.replacements))
        if done.record.world_invariant:
            metrics[f"{self.log_prefix}moved_samples"] = float(done.record.moved)
            metrics[f"{self.log_prefix}moved_bytes"] = float(done.record.moved_bytes)
        logger.log_metrics(metrics)
        if self.selection_log:
            replaced = [(r.failed, r.stand_in) for r in done.replacements]
            append_selection_log(
                self.selection_log, step, done.batch["keys"], replaced, done.indices
            )
