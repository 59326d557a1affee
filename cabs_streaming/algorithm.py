"""Concept-Aware Batch Sampling as a Composer ``Algorithm``: the thin adapter of the design.

At ``Event.AFTER_DATALOADER`` the superbatch from ``ConceptCollator`` is on every rank. This
module all-gathers the ragged concept ids (sizes first, then a padded payload; gloo and NCCL),
runs the configured selection policy (a pure function of the global ids, the seed and the step,
``cabs_streaming.selection``), keeps this rank's share, decodes and augments ONLY the kept images
and replaces ``state.batch`` with the kept batch ``{"images", "text", "keys"}``. With
``lookahead`` and a ``LookaheadDataLoader`` the work for step ``t + 1`` is started during step
``t`` (selection on the main thread, decoding on a background thread), so decoding overlaps
the model step as it does in plain training's loader workers; the batches are the same.

Composer counted the batch's samples before this event fired (ARCHITECTURE decision 3), so the
sample counter and the dataset's resume position stay those of the superbatch that was drawn,
while the model trains on the kept part. Selection lives here and never in
``DataSpec.batch_transforms``, which runs before the count.

The functions below hold the logic (gathering, digests, building the kept batch); the class only
stores hyper-parameters and calls them, like Composer's own algorithms.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from composer.utils import dist

from cabs_streaming.dataset import CaptionTokenizer, LookaheadDataLoader
from cabs_streaming.decode import DecodedImage, ImageDecodeError, ImageDecoder
from cabs_streaming.selection import (
    SelectionPolicy,
    SelectionResult,
    get_policy,
    select,
    stand_ins,
)

__all__ = [
    "ConceptAwareBatchSampling",
    "SelectionRecord",
    "gather_concepts",
    "keep_per_rank",
    "selection_digest",
]

log = logging.getLogger(__name__)

#: What ``on_decode_error`` accepts.
DECODE_ERROR_MODES = ("raise", "replace")

#: Keys ``ConceptCollator`` produces that selection needs.
REQUIRED_KEYS = ("keys", "image_bytes", "concept_offsets", "concept_ids")

#: A replaced image: ``(step, rank, failed key, stand-in key, why the failed one did not decode)``.
_Replacement = tuple[int, int, str, str, str]


def _is_superbatch(batch: Any) -> bool:
    """Whether ``batch`` is a ``ConceptCollator`` superbatch (has what selection needs)."""
    return isinstance(batch, Mapping) and all(key in batch for key in REQUIRED_KEYS)


def keep_per_rank(superbatch: int, filter_ratio: float) -> int:
    """Samples kept per rank, ``superbatch * (1 - filter_ratio)``; it must be a whole number.

    A fractional quota would make ranks disagree on the batch size or silently round; the error
    says which sizes would work.
    """
    if not 0.0 <= filter_ratio < 1.0:
        raise ValueError(f"filter_ratio must lie in [0, 1), got {filter_ratio}")
    kept = superbatch * (1.0 - filter_ratio)
    k = round(kept)
    if k < 1 or abs(kept - k) > 1e-6:
        raise ValueError(
            f"a superbatch of {superbatch} per rank with filter_ratio={filter_ratio} keeps "
            f"{kept:g} samples, not a whole number: choose the batch size so that "
            "superbatch * (1 - filter_ratio) is an integer"
        )
    return k


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
    """The last selection, for callbacks that monitor concept diversity.

    ``offsets``/``ids`` are the global superbatch's concept lists (rank-major CSR); ``kept`` is
    ``int64 [world, k]`` local indices per rank; ``per_rank`` the superbatch size per rank.
    """

    step: int
    offsets: np.ndarray
    ids: np.ndarray
    kept: np.ndarray
    per_rank: int
    result: SelectionResult

    @property
    def kept_global(self) -> np.ndarray:
        """Kept samples as global indices, ``int64 [world * k]``."""
        starts = np.arange(self.kept.shape[0], dtype=np.int64)[:, None] * self.per_rank
        return (self.kept + starts).ravel()


@dataclass
class _Prepared:
    """One step's selection, and its kept batch: built already, or being built in the background."""

    step: int
    keys: list[str]  # the superbatch's keys: what it was built from
    record: SelectionRecord
    done: tuple[dict[str, Any], list[_Replacement]] | None = None
    future: Future | None = None

    def is_for(self, step: int, keys: Sequence[str]) -> bool:
        """Whether this was built from ``keys`` at ``step``.

        Selection and decoding are pure functions of the samples and the step, so a match
        means the very same kept batch.
        """
        return self.step == step and self.keys == list(keys)

    def collect(self) -> tuple[dict[str, Any], list[_Replacement]]:
        """The kept batch and its replacements; waits for the background work, re-raising."""
        if self.future is not None:
            return self.future.result()
        assert self.done is not None
        return self.done

    def discard(self) -> None:
        """Drop work nobody will train on (its errors included), once it has stopped."""
        if self.future is not None and not self.future.cancel():
            self.future.exception()  # waits; the error, if any, concerns no trained sample


class ConceptAwareBatchSampling(Algorithm):
    """Keep the most useful ``1 - filter_ratio`` share of every superbatch, by concepts.

    Runs at ``Event.AFTER_DATALOADER`` on batches from ``ConceptCollator``: all-gathers the
    concept ids, selects with ``policy`` (``"iid"``, ``"frequency"`` = CABS-FM, ``"diversity"``
    = CABS-DM, or any registered name) using ``step = state.timestamp.batch``, keeps this rank's
    share, decodes and augments only those images with ``decoder``, and sets ``state.batch`` to
    ``{"images": float [k, 3, H, W], "text": int64 [k, L], "keys": list[str]}``.

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
            this rank's unkept samples, in the policy's order of preference
            (``SelectionPolicy.reserve``), whose image decodes (``"replace"``). The stand-in
            takes the failed sample's slot and augmentation seed, so the choice is as
            deterministic as the selection; each replacement is logged as a warning, counted
            in ``cabs/decode_replaced``, kept in ``replacements`` and written to the selection
            log.
        lookahead: with a ``LookaheadDataLoader``, select step ``t + 1`` right after step
            ``t``'s batch is handed over and decode its kept images on a background thread
            while the model trains on step ``t``, as loader workers do for plain training.
            The batches are identical with and without it; it costs one superbatch of encoded
            bytes and one kept batch of memory. With other loaders it has no effect.
        log_prefix: prefix of the logged statistics.

    Example::

        from composer import Trainer
        from cabs_streaming.algorithm import ConceptAwareBatchSampling
        from cabs_streaming.decode import ImageDecoder

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
    ) -> None:
        if not 0.0 <= filter_ratio < 1.0:
            raise ValueError(f"filter_ratio must lie in [0, 1), got {filter_ratio}")
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
        self.tokenizer = (
            CaptionTokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        )
        self.verify_consensus = verify_consensus
        self.selection_log = os.fspath(selection_log) if selection_log else None
        self.num_concepts = num_concepts
        self.on_decode_error = on_decode_error
        self.lookahead = lookahead
        self.log_prefix = log_prefix
        self._pending: _Prepared | None = None
        #: Steps whose kept batch was built in the background during the step before.
        self.looked_ahead = 0
        self._executor: ThreadPoolExecutor | None = None
        self.last: SelectionRecord | None = None
        #: ``(step, rank, failed key, stand-in key)`` for every replaced image of this process.
        self.replacements: list[tuple[int, int, str, str]] = []

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(policy={self.policy.config()!r}, "
            f"filter_ratio={self.filter_ratio}, seed={self.seed})"
        )

    # ------------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Plain values only, identical on every rank (Composer saves rank 0's)."""
        return {
            "policy": self.policy.config(),
            "filter_ratio": self.filter_ratio,
            "seed": self.seed,
            "repr": repr(self),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore (selection is a pure function); warn if the config changed."""
        saved = {k: state.get(k) for k in ("policy", "filter_ratio", "seed")}
        current = {k: v for k, v in self.state_dict().items() if k in saved}
        if saved != current:
            warnings.warn(
                f"resuming with a different CABS configuration: the checkpoint used {saved}, "
                f"this run uses {current}; batches from here on follow the new configuration",
                stacklevel=2,
            )

    # ------------------------------------------------------------------------------ the event

    def match(self, event: Event, state: State) -> bool:
        """Run right after each training batch is drawn (and counted), and at the end of fit."""
        return event in (Event.AFTER_DATALOADER, Event.FIT_END)

    def drop_lookahead(self) -> None:
        """Forget the step being prepared in the background (waiting for its thread first)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.discard()

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        """Select, decode the kept images and replace ``state.batch`` with the kept batch.

        With ``lookahead``, step ``t``'s work was already done in the background during step
        ``t - 1`` and is only collected here; then step ``t + 1``'s selection runs (its
        collectives stay on this thread, in the same order on every rank) and its decoding is
        started in the background. The batches are the same either way. At ``FIT_END`` a step
        prepared beyond the end of training is dropped.
        """
        if event == Event.FIT_END:
            self.drop_lookahead()
            return
        batch = state.batch
        if not _is_superbatch(batch):
            found = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise TypeError(
                "ConceptAwareBatchSampling needs batches from cabs_streaming.dataset."
                f"ConceptCollator (a dict with {list(REQUIRED_KEYS)}); got {found}"
            )
        step = int(state.timestamp.batch)
        device = _collective_device(state)
        prepared, self._pending = self._pending, None
        if prepared is None or not prepared.is_for(step, batch["keys"]):
            if prepared is not None:
                prepared.discard()
            prepared = self._prepare(batch, step, device, background=False)
        elif prepared.future is not None:
            self.looked_ahead += 1
        kept, replaced = prepared.collect()
        state.batch = kept = self._settle(kept, replaced)
        self.last = prepared.record
        metrics = prepared.record.result.stats.as_dict(self.log_prefix)
        metrics[f"{self.log_prefix}decode_replaced"] = float(len(replaced))
        logger.log_metrics(metrics)
        if self.selection_log:
            self._append_log(step, kept["keys"], [r[2:4] for r in replaced])
        if self.lookahead:
            self._pending = self._look_ahead(state, step + 1, device)

    def _prepare(
        self, batch: Mapping[str, Any], step: int, device: torch.device, *, background: bool
    ) -> _Prepared:
        """Select step ``step`` (collectives, on this thread) and decode its kept images.

        The decoding runs on a background thread when ``background``, else before returning.
        """
        rank = dist.get_global_rank()
        world = dist.get_world_size()
        n = len(batch["keys"])
        k = keep_per_rank(n, self.filter_ratio)
        offsets, ids = gather_concepts(batch["concept_offsets"], batch["concept_ids"], device)
        result = select(
            self.policy, offsets, ids, world=world, k=k, seed=self.seed, step=step,
            num_concepts=self.num_concepts,
        )
        if self.verify_consensus:
            verify_consensus(result.kept, step, device)

        def reserve() -> np.ndarray:
            return stand_ins(
                self.policy, offsets, ids, world, result.kept, rank, self.seed, step,
                self.num_concepts,
            )

        def build() -> tuple[dict[str, Any], list[_Replacement]]:
            return self._build(batch, result.for_rank(rank), step, rank, reserve)

        record = SelectionRecord(step, offsets, ids, result.kept, n, result)
        if not background:
            return _Prepared(step, list(batch["keys"]), record, done=build())
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="cabs-lookahead")
        return _Prepared(step, list(batch["keys"]), record, future=self._executor.submit(build))

    def _look_ahead(self, state: State, step: int, device: torch.device) -> _Prepared | None:
        """Start step ``step`` from the loader's next batch, when every rank has one."""
        loader = getattr(state, "dataloader", None)
        upcoming = loader.peek() if isinstance(loader, LookaheadDataLoader) else None
        usable = _is_superbatch(upcoming)
        if dist.get_world_size() > 1:
            # Every rank must take part in the selection's collectives, or none.
            flag = torch.tensor([1 if usable else 0], dtype=torch.int32, device=device)
            dist.all_reduce(flag, reduce_operation="MIN")
            usable = bool(flag.item())
        if not usable:
            return None
        assert isinstance(upcoming, Mapping)
        return self._prepare(upcoming, step, device, background=True)

    def kept_batch(
        self,
        batch: Mapping[str, Any],
        kept: np.ndarray,
        *,
        step: int,
        rank: int,
        reserve: Callable[[], np.ndarray] | None = None,
    ) -> dict[str, Any]:
        """The model's batch from this rank's kept local indices: decode and tokenize only them.

        ``reserve`` gives the stand-ins for undecodable images (``on_decode_error="replace"``):
        this rank's unkept local indices in the policy's order, computed only when needed.
        Replacements are recorded in ``replacements``.
        """
        return self._settle(*self._build(batch, kept, step, rank, reserve))

    def _settle(self, out: dict[str, Any], replaced: list[_Replacement]) -> dict[str, Any]:
        """Finish a batch from :meth:`_build` on the calling thread, when it is trained on.

        Puts the images on the device where ``_build`` left that to the caller, and warns
        about and records each replacement (never for work that is dropped).
        """
        decoded = out.pop("decoded")
        if out["images"] is None:
            out["images"] = self.decoder.to_tensor(decoded)
        for step, rank, bad_key, key, cause in replaced:
            log.warning(
                "step %d, rank %d: the image of kept sample %r cannot be decoded (%s); training "
                "on %r instead (decode.on_error=replace)",
                step, rank, bad_key, cause, key,
            )
            self.replacements.append((step, rank, bad_key, key))
        return out

    def _build(
        self,
        batch: Mapping[str, Any],
        kept: np.ndarray,
        step: int,
        rank: int,
        reserve: Callable[[], np.ndarray] | None,
    ) -> tuple[dict[str, Any], list[_Replacement]]:
        """Decode and tokenize the kept samples; thread-safe (it touches no shared state).

        Returns the batch, whose ``images`` is None on a GPU (``decoded`` then holds the
        ``uint8`` images for :meth:`ImageDecoder.to_tensor`, which the caller runs), and the
        replacements as ``(step, rank, failed key, stand-in key, cause)``.
        """
        index = kept.tolist()
        keys = [batch["keys"][i] for i in index]
        out = self.decoder.output_buffer(len(index))
        decoded = self.decoder.decode_pixels(
            [batch["image_bytes"][i] for i in index], keys, step=step, rank=rank,
            errors="return", out=out,
        )
        failed = [slot for slot, d in enumerate(decoded) if isinstance(d, ImageDecodeError)]
        replaced: list[_Replacement] = []
        if failed:
            replaced = self._replace(batch, index, decoded, failed, step, rank, reserve, out)
            keys = [batch["keys"][i] for i in index]
        if "text" in batch:
            text = batch["text"][torch.as_tensor(index, dtype=torch.long)]
        elif self.tokenizer is not None:
            text = self.tokenizer([batch["captions"][i] for i in index])
        else:
            raise ValueError(
                "the batch has no 'text' tokens and the algorithm has no tokenizer: give the "
                "dataset a tokenizer, or ConceptAwareBatchSampling(tokenizer=...) to tokenize "
                "only the kept captions"
            )
        return {"images": out, "decoded": decoded, "text": text, "keys": keys}, replaced

    def _replace(
        self,
        batch: Mapping[str, Any],
        index: list[int],
        decoded: list[Any],
        failed: list[int],
        step: int,
        rank: int,
        reserve: Callable[[], np.ndarray] | None,
        out: torch.Tensor | None,
    ) -> list[_Replacement]:
        """Fill the failed slots of ``decoded``/``index`` in place, or raise (see the class).

        Returns ``(step, rank, failed key, stand-in key, cause)`` per replaced slot.
        """
        first = decoded[failed[0]]
        if self.on_decode_error == "raise" or reserve is None:
            raise ImageDecodeError(
                first.key,
                f"{first.cause} (training step {step}, rank {rank}; with decode.on_error="
                "replace the rank's next unkept sample would be trained on instead)",
            )
        replaced = []
        candidates = iter(reserve().tolist())
        for slot in failed:
            bad_key = batch["keys"][index[slot]]
            for candidate in candidates:
                key = batch["keys"][candidate]
                result = self.decoder.decode_or_error(
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
            replaced.append((step, rank, bad_key, key, str(decoded[slot].cause)))
            index[slot] = candidate
            decoded[slot] = result
        return replaced

    def _append_log(
        self, step: int, kept_keys: Sequence[str], replaced: Sequence[tuple[str, str]]
    ) -> None:
        every_rank = dist.all_gather_object((list(kept_keys), [list(r) for r in replaced]))
        if dist.get_global_rank() != 0:
            return
        assert self.selection_log is not None
        folder = os.path.dirname(self.selection_log)
        if folder:
            os.makedirs(folder, exist_ok=True)
        record: dict[str, Any] = {"step": step, "keys": [keys for keys, _ in every_rank]}
        if any(pairs for _, pairs in every_rank):
            record["replaced"] = [pairs for _, pairs in every_rank]
        with open(self.selection_log, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _collective_device(state: State) -> torch.device:
    """Where collective tensors must live: the GPU under NCCL, the CPU otherwise."""
    backend = state.device.dist_backend if state.device is not None else "gloo"
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
