"""The measuring half of ``cabs-bench-pipeline``: data, the configurations, the rounds.

:mod:`cabs_streaming.bench.pipeline` parses the command line (and says what is measured and
why) without importing this module, so that ``--help`` needs neither torch nor open_clip.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import math
import multiprocessing
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from PIL import Image, ImageEnhance
from torch.utils.data import DataLoader, get_worker_info

from cabs_streaming.bench.selection import make_superbatch
from cabs_streaming.concepts import MDS_COLUMNS, Vocabulary, encode_concepts
from cabs_streaming.dataset import (
    CaptionTokenizer,
    ConceptCollator,
    ConceptStreamingDataset,
    LookaheadDataLoader,
)
from cabs_streaming.decode import ImageDecoder

#: Photographs inside the scikit-image wheel (colour ones; no download needed).
SKIMAGE_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "retina.jpg",
    "rocket.jpg",
)
#: Version of the generated data: bump when the generator changes, so a cached --data dir is
#: regenerated rather than silently reused.
DATA_VERSION = 1
LONG_SIDE = (256, 512)
SIZE_KB = (30.0, 60.0)
QUALITY = (40, 97)

CAPTION_TEMPLATES = (
    "a photo of {}",
    "{}",
    "close-up of {} on a wooden table",
    "stock photo: {} in the city at night",
    "{} at the beach, summer holiday",
    "my new {}!!",
    "vintage postcard showing {}",
    "{} for sale - free shipping",
    "an illustration of {} in watercolor style",
    "IMG_{n} {}",
)
CAPTION_FILLERS = (
    "beautiful",
    "cheap",
    "best",
    "2019",
    "high resolution",
    "HD wallpaper",
    "near the old",
    "with family",
    "in the morning light",
    "download",
    "royalty free",
    "on white background",
)


def log(message: str) -> None:
    """Progress goes to stderr; stdout carries only the JSON line."""
    print(f"[bench_pipeline] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Data generation
# ------------------------------------------------------------------------------------------------


def photograph_paths() -> list[Path]:
    """The real photographs the images are cut from (all ship inside installed wheels)."""
    import matplotlib
    import skimage.data

    root = Path(skimage.data.__file__).parent
    paths = [root / name for name in SKIMAGE_PHOTOS]
    paths.append(Path(matplotlib.__file__).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"photographs missing: {missing}; install the dev extra (scikit-image)")
    return paths


_PHOTOS: list[Image.Image] = []


def _photos() -> list[Image.Image]:
    if not _PHOTOS:
        for path in photograph_paths():
            with Image.open(path) as img:
                _PHOTOS.append(img.convert("RGB"))
    return _PHOTOS


def _encode(img: Image.Image, quality: int, subsampling: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, subsampling=subsampling)
    return buf.getvalue()


def _encode_near(img: Image.Image, target: float, subsampling: int) -> tuple[bytes, int]:
    """The baseline JPEG whose size is nearest ``target`` bytes (binary search on quality)."""
    lo, hi = QUALITY
    cache: dict[int, bytes] = {}

    def enc(q: int) -> bytes:
        if q not in cache:
            cache[q] = _encode(img, q, subsampling)
        return cache[q]

    while lo < hi:  # largest quality whose size is <= target (size grows with quality)
        mid = (lo + hi + 1) // 2
        if len(enc(mid)) <= target:
            lo = mid
        else:
            hi = mid - 1
    low, high = SIZE_KB[0] * 1024, SIZE_KB[1] * 1024
    candidates = [q for q in (lo, lo + 1) if q <= QUALITY[1]]
    best = min(
        candidates,
        key=lambda q: (not low <= len(enc(q)) <= high, abs(len(enc(q)) - target)),
    )
    return enc(best), best


def make_image(seed: int, index: int) -> tuple[bytes, dict[str, Any]]:
    """Sample ``index``'s JPEG: a random crop of a photograph, rescaled and re-encoded."""
    rng = np.random.default_rng([seed, 7, index])
    photos = _photos()
    src = photos[int(rng.integers(len(photos)))]
    width, height = src.size
    area = rng.uniform(0.35, 1.0) * width * height
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w = min(width, max(64, round(math.sqrt(area * aspect))))
    h = min(height, max(64, round(math.sqrt(area / aspect))))
    left = int(rng.integers(0, width - w + 1))
    top = int(rng.integers(0, height - h + 1))
    crop = src.crop((left, top, left + w, top + h))
    flip = rng.random() < 0.5
    color, brightness = rng.uniform(0.8, 1.2), rng.uniform(0.85, 1.15)
    long_side = int(rng.integers(LONG_SIDE[0], LONG_SIDE[1] + 1))
    target = rng.uniform(*SIZE_KB) * 1024
    low, high = SIZE_KB[0] * 1024, SIZE_KB[1] * 1024
    while True:
        scale = long_side / max(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = crop.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        img = ImageEnhance.Color(img).enhance(color)
        img = ImageEnhance.Brightness(img).enhance(brightness)
        for subsampling in (2, 0):  # 4:2:0 (most web JPEGs), then 4:4:4 for detail-poor crops
            data, quality = _encode_near(img, target, subsampling)
            if low <= len(data) <= high or len(data) > target:
                break
        if low <= len(data) or long_side >= LONG_SIDE[1]:
            break
        long_side = min(LONG_SIDE[1], round(long_side * 1.2))  # too smooth to reach the size
    info = {
        "long_side": long_side,
        "bytes": len(data),
        "quality": quality,
        "subsampling": subsampling,
    }
    return data, info


def concept_names(vocabulary: int) -> list[str]:
    """Unique concept names built from ImageNet class names."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    base = list(IMAGENET_CLASSNAMES)
    names: list[str] = []
    seen: set[str] = set()
    for i in range(vocabulary):
        name = base[i % len(base)]
        if name in seen:  # later rounds over the list, and ImageNet's own repeats ("crane")
            name = f"{name} ({i})"
        seen.add(name)
        names.append(name)
    return names


def make_caption(seed: int, index: int, ids: np.ndarray, names: Sequence[str]) -> str:
    """An alt-text-like caption mentioning up to three of the sample's concepts."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    rng = np.random.default_rng([seed, 11, index])
    unique = list(dict.fromkeys(int(i) for i in ids))[:3]
    if unique:
        things = [IMAGENET_CLASSNAMES[i % len(IMAGENET_CLASSNAMES)] for i in unique]
    else:
        things = [IMAGENET_CLASSNAMES[int(rng.integers(len(IMAGENET_CLASSNAMES)))]]
    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    number = str(int(rng.integers(1000, 10_000)))
    text = template.replace("{n}", number).format(" and ".join(things))
    extra = int(rng.integers(0, 4))
    fillers = [CAPTION_FILLERS[int(j)] for j in rng.integers(0, len(CAPTION_FILLERS), size=extra)]
    return " ".join([text, *fillers])


def _image_task(args: tuple[int, int]) -> tuple[bytes, dict[str, Any]]:
    return make_image(*args)


def generate_data(
    out: Path, samples: int, seed: int, vocabulary: int, processes: int
) -> dict[str, Any]:
    """Write the benchmark's MDS dataset and vocabulary into ``out``; returns its statistics."""
    from streaming import MDSWriter

    offsets, ids = make_superbatch(seed, vocabulary=vocabulary, world=1, per_rank=samples)
    names = concept_names(vocabulary)
    out.mkdir(parents=True, exist_ok=True)
    infos: list[dict[str, Any]] = []
    started = time.perf_counter()
    context = multiprocessing.get_context("fork")
    with (
        context.Pool(max(1, processes)) as pool,
        MDSWriter(out=str(out), columns=MDS_COLUMNS, size_limit="64mb") as writer,
    ):
        tasks = ((seed, i) for i in range(samples))
        for i, (data, info) in enumerate(pool.imap(_image_task, tasks, chunksize=32)):
            concepts = ids[offsets[i] : offsets[i + 1]]
            writer.write(
                {
                    "key": f"bench-{i:08d}",
                    "image": data,
                    "caption": make_caption(seed, i, concepts, names),
                    "recaption": "",
                    "concepts": encode_concepts(concepts),
                    "concept_scores": b"",
                }
            )
            infos.append(info)
            if (i + 1) % 2000 == 0:
                log(f"generated {i + 1}/{samples} images ({time.perf_counter() - started:.0f} s)")
    Vocabulary(names).save(str(out))
    kb = np.array([info["bytes"] for info in infos]) / 1024
    sides = np.array([info["long_side"] for info in infos])
    stats = {
        "version": DATA_VERSION,
        "samples": samples,
        "seed": seed,
        "vocabulary": vocabulary,
        "image_kb": {
            "mean": round(float(kb.mean()), 1),
            "min": round(float(kb.min()), 1),
            "p5": round(float(np.percentile(kb, 5)), 1),
            "p95": round(float(np.percentile(kb, 95)), 1),
            "max": round(float(kb.max()), 1),
            "share_in_30_60": round(float(np.mean((kb >= SIZE_KB[0]) & (kb <= SIZE_KB[1]))), 3),
        },
        "long_side_px": {
            "mean": round(float(sides.mean()), 1),
            "min": int(sides.min()),
            "max": int(sides.max()),
        },
        "jpeg_quality_mean": round(float(np.mean([info["quality"] for info in infos])), 1),
        "share_444": round(float(np.mean([info["subsampling"] == 0 for info in infos])), 3),
        "concept_instances_mean": round(float(np.diff(offsets).mean()), 2),
        "distinct_images": samples,
        "sources": [p.name for p in photograph_paths()],
        "generation_s": round(time.perf_counter() - started, 1),
    }
    (out / "bench_data.json").write_text(json.dumps(stats, indent=1))
    return stats


def prepare_data(args: argparse.Namespace) -> tuple[Path, dict[str, Any], Path | None]:
    """Reuse ``--data`` if it holds this exact data, else generate it; returns (dir, stats, tmp)."""
    tmp = None
    if args.data is None:
        tmp = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
        data = tmp / "mds"
    else:
        data = args.data
    meta = data / "bench_data.json"
    wanted = {
        "version": DATA_VERSION,
        "samples": args.samples,
        "seed": args.seed,
        "vocabulary": args.vocabulary,
    }
    if meta.is_file():
        stats = json.loads(meta.read_text())
        if {k: stats.get(k) for k in wanted} == wanted:
            log(f"reusing {data}")
            return data, stats, tmp
        raise SystemExit(
            f"{data} holds other benchmark data ({ {k: stats.get(k) for k in wanted} }, wanted "
            f"{wanted}): pass another --data directory or delete this one"
        )
    if data.exists() and any(data.iterdir()):
        raise SystemExit(f"{data} is not empty and holds no bench_data.json: pick an empty dir")
    log(f"generating {args.samples} samples into {data}")
    stats = generate_data(data, args.samples, args.seed, args.vocabulary, args.gen_processes)
    return data, stats, tmp


# ------------------------------------------------------------------------------------------------
# Instrumented parts (the real classes, counting and timing their calls)
# ------------------------------------------------------------------------------------------------


class CountingDecoder(ImageDecoder):
    """``ImageDecoder`` that counts decoded images and times its stages (in its own process).

    ``decode_pixels`` is wall time of the whole threaded decode, including any per-image
    normalisation the decoder does in its threads (``normalize_into``, whose thread-seconds are
    also summed separately as ``normalize_rows``); ``normalize`` is wall time of a separate
    whole-batch normalisation pass, where the decoder makes one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Zero the counters."""
        self.decoded = 0
        self.seconds = {"decode_pixels": 0.0, "normalize": 0.0, "normalize_rows": 0.0}

    def decode_pixels(self, images: Sequence[bytes], keys: Sequence[str], **kwargs: Any) -> list:
        """Decode (thread pool) and count."""
        started = time.perf_counter()
        out = super().decode_pixels(images, keys, **kwargs)
        self.seconds["decode_pixels"] += time.perf_counter() - started
        self.decoded += len(images)
        return out

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalise a batch and time it."""
        started = time.perf_counter()
        out = super().normalize(pixels)
        self.seconds["normalize"] += time.perf_counter() - started
        return out

    def normalize_into(self, row: torch.Tensor, pixels: np.ndarray) -> None:
        """Normalise one image into its row (decoding threads call this) and time it."""
        started = time.perf_counter()
        super().normalize_into(row, pixels)  # type: ignore[misc]
        with self._lock:
            self.seconds["normalize_rows"] += time.perf_counter() - started

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class CountingTokenizer(CaptionTokenizer):
    """``CaptionTokenizer`` that counts and times the captions it tokenizes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reset()

    def reset(self) -> None:
        """Zero the counters."""
        self.tokenized = 0
        self.seconds = 0.0

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        """Tokenize, count and time."""
        started = time.perf_counter()
        out = super().__call__(captions)
        self.seconds += time.perf_counter() - started
        self.tokenized += len(captions)
        return out


class DecodeInLoader:
    """Collate function for ``iid``/``eager``: collate, tokenize and decode in the worker.

    Uses ``ConceptCollator(tokenizer=...)`` (batch tokenization of every caption) and a
    one-thread ``ImageDecoder`` on every image of the batch, and reports its counts and timings
    in the batch so the main process can check them.
    """

    def __init__(self, decoder: CountingDecoder, tokenizer: CountingTokenizer) -> None:
        self.collator = ConceptCollator(tokenizer=tokenizer)
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.calls = 0

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Collate ``samples`` into decoded images, tokens and concept ids."""
        started = time.perf_counter()
        self.decoder.reset()
        self.tokenizer.reset()
        batch = self.collator(samples)
        info = get_worker_info()
        rank = info.id if info is not None else 0
        images = self.decoder(batch["image_bytes"], batch["keys"], step=self.calls, rank=rank)
        self.calls += 1
        return {
            "images": images,
            "text": batch["text"],
            "keys": batch["keys"],
            "concept_offsets": batch["concept_offsets"],
            "concept_ids": batch["concept_ids"],
            "worker": {
                "decoded": self.decoder.decoded,
                "tokenized": self.tokenizer.tokenized,
                "decode_pixels": self.decoder.seconds["decode_pixels"],
                "normalize": self.decoder.seconds["normalize"],
                "normalize_rows": self.decoder.seconds["normalize_rows"],
                "tokenize": self.tokenizer.seconds,
                "collate_total": time.perf_counter() - started,
            },
        }


class MemorySampler(threading.Thread):
    """Samples memory summed over this process and its children, per configuration.

    RSS (``/proc/PID/statm``, microseconds per process) every ``interval`` seconds. PSS needs
    ``/proc/PID/smaps_rollup``, which walks the page tables under the process's memory-map lock
    (about 18 ms for a process with 300 MB resident) and so slows the page faults of the very
    code being timed; it is sampled only with ``pss_interval > 0``, off by default.
    """

    def __init__(self, interval: float, pss_interval: float = 0.0) -> None:
        super().__init__(daemon=True, name="memory-sampler")
        self.interval = interval
        self.pss_interval = pss_interval
        self.label = "setup"
        self.peak_rss: dict[str, int] = {}
        self.peak_pss: dict[str, int] = {}
        self._stop_event = threading.Event()
        self._main = psutil.Process(os.getpid())
        self._last_pss = -math.inf

    def sample(self) -> None:
        """One sample of every process in the tree."""
        now = time.monotonic()
        with_pss = self.pss_interval > 0 and now - self._last_pss >= self.pss_interval
        rss = pss = 0
        try:
            processes = [self._main, *self._main.children(recursive=True)]
        except psutil.Error:
            return
        for proc in processes:
            try:
                if with_pss:
                    info = proc.memory_full_info()
                    pss += info.pss
                else:
                    info = proc.memory_info()
            except psutil.Error:  # a worker that just exited
                continue
            rss += info.rss
        label = self.label
        self.peak_rss[label] = max(self.peak_rss.get(label, 0), rss)
        if with_pss:
            self._last_pss = now
            self.peak_pss[label] = max(self.peak_pss.get(label, 0), pss)

    def run(self) -> None:
        """Sample until stopped."""
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        """Stop sampling after one last sample."""
        self._stop_event.set()
        self.join()
        self.sample()


# ------------------------------------------------------------------------------------------------
# The three configurations
# ------------------------------------------------------------------------------------------------


CPUS = len(os.sched_getaffinity(0))


def tree_cpu_seconds() -> tuple[float, float]:
    """User + system CPU seconds of (this process, its live children: the DataLoader workers)."""
    main = psutil.Process(os.getpid())
    times = main.cpu_times()
    own = times.user + times.system
    children = 0.0
    for proc in main.children(recursive=True):
        try:
            times = proc.cpu_times()
        except psutil.Error:  # a child that just exited
            continue
        children += times.user + times.system
    return own, children


def _stats(values: Sequence[float]) -> dict[str, float]:
    med = statistics.median(values)
    return {
        "median": round(med, 1),
        "min": round(min(values), 1),
        "max": round(max(values), 1),
        "spread_pct": round(100 * (max(values) - min(values)) / med, 1) if med else 0.0,
    }


class Bench:
    """Builds and times one configuration at a time."""

    def __init__(self, args: argparse.Namespace, data: Path, num_concepts: int) -> None:
        from cabs_streaming.algorithm import Lookahead
        from cabs_streaming.selection import get_policy
        from cabs_streaming.selection.sizes import superbatch_size

        self.args = args
        self.data = data
        self.num_concepts = num_concepts
        self.k = args.kept_batch
        try:
            self.n = superbatch_size(self.k, args.filter_ratio)
        except ValueError as err:
            raise SystemExit(f"--kept-batch, --filter-ratio: {err}") from None
        self.iid = get_policy("iid", {})
        self.diversity = get_policy("diversity", {})

        def decoder(threads: int | None) -> CountingDecoder:
            return CountingDecoder.from_model_name(
                args.model,
                is_train=True,
                seed=args.seed,
                num_threads=threads,
                resampler=args.resampler,
            )

        self.worker_decoder = decoder(1)
        self.worker_tokenizer = CountingTokenizer(args.model)
        self.main_decoder = decoder(args.decode_threads)
        self.main_tokenizer = CountingTokenizer(args.model)
        # ``deferred`` decodes each step when it is due, ``lookahead`` one step ahead.
        self.ahead = Lookahead()
        self.current_loader: DataLoader | None = None
        self.select_seconds = 0.0
        self.moved = [0, 0]  # samples and bytes moved between ranks (``invariant``)
        self.image_size = self.main_decoder.output_size
        self.context_length = self.main_tokenizer.context_length
        self._warm_kernels()

    def _warm_kernels(self) -> None:
        """Compile the numba selection kernels before anything is timed."""
        from cabs_streaming.selection import select

        offsets, ids = make_superbatch(0, vocabulary=self.num_concepts, world=1, per_rank=self.n)
        for policy, k in ((self.iid, self.n), (self.diversity, self.k)):
            select(
                policy, offsets, ids, world=1, k=k, seed=0, step=0, num_concepts=self.num_concepts
            )

    def dataset(self, batch_size: int, round_index: int) -> ConceptStreamingDataset:
        """A fresh dataset (the previous one on this local dir must be gone)."""
        return ConceptStreamingDataset(
            local=str(self.data),
            remote=None,
            batch_size=batch_size,
            shuffle=True,
            shuffle_seed=self.args.seed + round_index,
            tokenizer=None,
        )

    def loader(self, dataset: Any, batch_size: int, collate: Callable) -> DataLoader:
        """The DataLoader every configuration uses, only the batch size and collate differ.

        (A ``LookaheadDataLoader`` is a ``DataLoader`` that can show its next batch early; only
        the ``lookahead`` configuration looks.)
        """
        workers = self.args.workers
        return LookaheadDataLoader(
            dataset,
            batch_size=batch_size,
            collate_fn=collate,
            num_workers=workers,
            prefetch_factor=self.args.prefetch if workers > 0 else None,
            drop_last=True,
            persistent_workers=False,
        )

    # -- per configuration: (dataset batch size, collate, process(batch, step) -> kept batch)

    def _select_and_gather(self, batch: dict[str, Any], policy: Any, k: int, step: int) -> dict:
        from cabs_streaming.algorithm import gather_concepts
        from cabs_streaming.selection import select

        offsets, ids = gather_concepts(batch["concept_offsets"], batch["concept_ids"])
        result = select(
            policy,
            offsets,
            ids,
            world=1,
            k=k,
            seed=self.args.seed,
            step=step,
            num_concepts=self.num_concepts,
        )
        kept = result.for_rank(0)
        if kept.shape[0] == len(batch["keys"]) and np.array_equal(kept, np.arange(kept.shape[0])):
            return {"images": batch["images"], "text": batch["text"], "keys": batch["keys"]}
        index = torch.as_tensor(kept, dtype=torch.long)
        return {
            "images": batch["images"][index],
            "text": batch["text"][index],
            "keys": [batch["keys"][i] for i in kept.tolist()],
        }

    def _deferred(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        return self._cabs_step(batch, step, None)

    def _lookahead(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        return self._cabs_step(batch, step, self.ahead)

    def _invariant(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        return self._cabs_step(batch, step, None, world_invariant=True)

    def _cabs_step(
        self, batch: dict[str, Any], step: int, ahead: Any, world_invariant: bool = False
    ) -> dict[str, Any]:
        """What ``ConceptAwareBatchSampling.apply`` runs in training (``cabs_step``)."""
        from cabs_streaming.algorithm import cabs_step

        loader = self.current_loader
        done = cabs_step(
            batch,
            step,
            policy=self.diversity,
            filter_ratio=self.args.filter_ratio,
            seed=self.args.seed,
            decoder=self.main_decoder,
            tokenizer=self.main_tokenizer,
            num_concepts=self.num_concepts,
            verify=True,  # as training; a no-op on one process
            lookahead=ahead,
            peek=loader.peek if loader is not None else None,
            world_invariant=world_invariant,
        )
        self.select_seconds += done.record.result.stats.wall_ms / 1e3  # the selection's own
        self.moved[0] += done.record.moved
        self.moved[1] += done.record.moved_bytes
        return done.batch

    def setup(self, config: str) -> tuple[int, Callable, Callable[[dict, int], dict]]:
        """Dataset/DataLoader batch size, collate function and main-process step of ``config``."""
        in_loader = DecodeInLoader(self.worker_decoder, self.worker_tokenizer)
        if config == "iid":
            return self.k, in_loader, lambda b, s: self._select_and_gather(b, self.iid, self.k, s)
        if config == "eager":
            return (
                self.n,
                in_loader,
                lambda b, s: self._select_and_gather(b, self.diversity, self.k, s),
            )
        if config == "deferred":
            return self.n, ConceptCollator(), self._deferred
        if config == "lookahead":
            return self.n, ConceptCollator(), self._lookahead
        if config == "invariant":
            return self.n, ConceptCollator(), self._invariant
        raise ValueError(config)

    def run(self, config: str, round_index: int) -> dict[str, Any]:
        """One timed round of ``config``; returns throughput, counts and timings."""
        args = self.args
        batch_size, collate, process = self.setup(config)
        dataset = self.dataset(batch_size, round_index)
        epoch_batches = dataset.size // (batch_size * _world())
        if args.warmup + args.steps > epoch_batches:
            raise SystemExit(
                f"{config}: {args.warmup + args.steps} batches of {batch_size} needed but the "
                f"dataset holds {dataset.size} samples; raise --samples"
            )
        loader = self.loader(dataset, batch_size, collate)
        self.current_loader = loader
        model_step_s = args.model_step_ms / 1e3
        self.main_decoder.reset()
        self.main_tokenizer.reset()
        iterator = iter(loader)
        for step in range(args.warmup):
            process(next(iterator), step)
            time.sleep(model_step_s)
        self.main_decoder.reset()
        self.main_tokenizer.reset()
        self.select_seconds = 0.0
        self.moved = [0, 0]
        wait = work = 0.0
        delivered = decoded = tokenized = 0
        worker = dict.fromkeys(
            ("decode_pixels", "normalize", "normalize_rows", "tokenize", "collate_total"), 0.0
        )
        cpu_started = tree_cpu_seconds()
        started = time.perf_counter()
        for step in range(args.warmup, args.warmup + args.steps):
            t0 = time.perf_counter()
            batch = next(iterator)
            t1 = time.perf_counter()
            out = process(batch, step)
            if args.consume:
                float(out["images"].sum())  # reads every pixel, like a host-to-device copy
            work += time.perf_counter() - t1
            wait += t1 - t0
            time.sleep(model_step_s)  # a GPU step: the CPU is free meanwhile
            if out["images"].shape != (self.k, 3, *self.image_size) or len(out["keys"]) != self.k:
                raise RuntimeError(f"{config}: unexpected kept batch {tuple(out['images'].shape)}")
            if out["text"].shape != (self.k, self.context_length):
                raise RuntimeError(f"{config}: unexpected tokens {tuple(out['text'].shape)}")
            delivered += len(out["keys"])
            if "worker" in batch:
                decoded += batch["worker"]["decoded"]
                tokenized += batch["worker"]["tokenized"]
                for key in worker:
                    worker[key] += batch["worker"][key]
            del batch, out
        elapsed = time.perf_counter() - started
        cpu_ended = tree_cpu_seconds()
        self.ahead.drop()  # the step after the window: never delivered
        self.current_loader = None
        cpu_main, cpu_workers = (b - a for a, b in zip(cpu_started, cpu_ended, strict=True))
        decoded += self.main_decoder.decoded
        tokenized += self.main_tokenizer.tokenized
        del iterator, loader, dataset
        gc.collect()
        per_step = 1e3 / args.steps
        result = {
            "samples_per_s": delivered / elapsed,
            "decoded_per_trained": decoded / delivered,
            "tokenized_per_trained": tokenized / delivered,
            "main_ms_per_step": {"wait": wait * per_step, "work": work * per_step},
            "cpu_busy_share": (cpu_main + cpu_workers) / (elapsed * CPUS),
            "cpu_ms_per_step": {"main": cpu_main * per_step, "workers": cpu_workers * per_step},
            # Everything the process tree spent (reading, selection, decoding, tokenizing) per
            # image the model would train on: the figure that sizes a node's loader cores.
            "cpu_ms_per_trained": (cpu_main + cpu_workers) * 1e3 / delivered,
        }
        if config == "invariant":
            result["moved_per_step"] = {
                "samples": self.moved[0] / args.steps,
                "bytes": self.moved[1] / args.steps,
            }
        if config in ("deferred", "lookahead", "invariant"):
            parts = {
                "select": self.select_seconds,
                "decode_pixels": self.main_decoder.seconds["decode_pixels"],
                "normalize": self.main_decoder.seconds["normalize"],
                "tokenize": self.main_tokenizer.seconds,
            }
            if config == "invariant":  # one decode_pixels call per image, on several threads:
                result["decode_thread_ms_per_step"] = parts.pop("decode_pixels") * per_step
            parts["rest"] = work - sum(parts.values())  # stack, index lists, apply's own work
            result["main_ms_per_step"]["work_breakdown"] = {
                key: value * per_step for key, value in parts.items()
            }
            # Thread-milliseconds, already inside decode_pixels when the decoder normalises
            # each image in its decoding thread.
            result["main_ms_per_step"]["normalize_rows_in_decode_threads"] = (
                self.main_decoder.seconds["normalize_rows"] * per_step
            )
        else:
            # Summed over the workers, per trained step: CPU-seconds of worker time.
            result["worker_ms_per_step"] = {key: value * per_step for key, value in worker.items()}
        return result


def _world() -> int:
    """Ranks of this benchmark: more than 1 only under a launcher (to measure ``invariant``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _prepare_on_every_rank(args: argparse.Namespace) -> tuple[Path, dict[str, Any], Path | None]:
    """``prepare_data``; under a launcher rank 0 generates ``--data`` before the others read it."""
    if _world() == 1:
        return prepare_data(args)
    from composer.utils import dist

    if args.data is None:
        raise SystemExit("on several ranks give --data DIR: every rank must read the same data")
    dist.initialize_dist("cpu")
    if dist.get_global_rank() == 0:
        prepare_data(args)
    dist.barrier()
    return prepare_data(args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Generate or reuse the data, run the interleaved rounds and print the JSON line."""
    load_at_start = os.getloadavg()[0]
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    data, data_stats, tmp = _prepare_on_every_rank(args)
    memory = MemorySampler(args.memory_interval, args.pss_interval)
    try:
        bench = Bench(args, data, args.vocabulary)
        memory.start()
        rounds: dict[str, list[dict[str, Any]]] = {c: [] for c in args.configs}
        for r in range(args.rounds):
            for config in args.configs:
                memory.label = config
                result = bench.run(config, r)
                memory.label = "between"
                rounds[config].append(result)
                log(
                    f"round {r + 1}/{args.rounds} {config}: {result['samples_per_s']:.1f} "
                    f"trained samples/s"
                )
    finally:
        if memory.is_alive():
            memory.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    per_config: dict[str, Any] = {}
    medians: dict[str, float] = {}
    for config, results in rounds.items():
        rates = [r["samples_per_s"] for r in results]
        medians[config] = statistics.median(rates)

        def median_of(path: Sequence[str], results: list = results) -> float:
            values = []
            for r in results:
                value: Any = r
                for part in path:
                    value = value[part]
                values.append(value)
            return round(statistics.median(values), 2)

        entry: dict[str, Any] = {
            "samples_per_s": _stats(rates),
            "per_round": [round(x, 1) for x in rates],
            "decoded_per_trained": median_of(["decoded_per_trained"]),
            "tokenized_per_trained": median_of(["tokenized_per_trained"]),
            "main_ms_per_step": {
                "wait": median_of(["main_ms_per_step", "wait"]),
                "work": median_of(["main_ms_per_step", "work"]),
            },
        }
        entry["cpu_busy_share"] = median_of(["cpu_busy_share"])
        entry["cpu_ms_per_trained"] = median_of(["cpu_ms_per_trained"])
        entry["cpu_ms_per_step"] = {
            role: median_of(["cpu_ms_per_step", role]) for role in ("main", "workers")
        }
        if "work_breakdown" in results[0]["main_ms_per_step"]:
            entry["main_ms_per_step"]["work_breakdown"] = {
                key: median_of(["main_ms_per_step", "work_breakdown", key])
                for key in results[0]["main_ms_per_step"]["work_breakdown"]
            }
            entry["main_ms_per_step"]["normalize_rows_in_decode_threads"] = median_of(
                ["main_ms_per_step", "normalize_rows_in_decode_threads"]
            )
        else:
            entry["worker_ms_per_step"] = {
                key: median_of(["worker_ms_per_step", key])
                for key in results[0]["worker_ms_per_step"]
            }
        if "decode_thread_ms_per_step" in results[0]:
            entry["decode_thread_ms_per_step"] = median_of(["decode_thread_ms_per_step"])
        if "moved_per_step" in results[0]:
            entry["moved_per_step"] = {
                key: median_of(["moved_per_step", key]) for key in ("samples", "bytes")
            }
        entry["peak_rss_mb"] = round(memory.peak_rss.get(config, 0) / 2**20, 1)
        if memory.peak_pss:
            entry["peak_pss_mb"] = round(memory.peak_pss.get(config, 0) / 2**20, 1)
        per_config[config] = entry

    def ratio(config: str) -> float | None:
        if config not in medians or "iid" not in medians:
            return None
        return round(medians[config] / medians["iid"], 3)

    def per_round_ratios(config: str) -> list[float] | None:
        if config not in rounds or "iid" not in rounds:
            return None
        return [
            round(x["samples_per_s"] / a["samples_per_s"], 3)
            for x, a in zip(rounds[config], rounds["iid"], strict=True)
        ]

    def paired_median(config: str) -> float | None:
        """Median of the per-round ratios: each round's pair shares that round's machine load."""
        ratios = per_round_ratios(config)
        return round(statistics.median(ratios), 3) if ratios else None

    usage_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    usage_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    line: dict[str, Any] = {
        "iid_samples_per_s": round(medians["iid"], 1) if "iid" in medians else None,
        "deferred_samples_per_s": round(medians["deferred"], 1) if "deferred" in medians else None,
        "eager_samples_per_s": round(medians["eager"], 1) if "eager" in medians else None,
        "lookahead_samples_per_s": (
            round(medians["lookahead"], 1) if "lookahead" in medians else None
        ),
        "deferred_ratio": ratio("deferred"),
        "eager_ratio": ratio("eager"),
        "lookahead_ratio": ratio("lookahead"),
        "peak_rss_mb": round(max(memory.peak_rss.values(), default=0) / 2**20, 1),
        "deferred_ratio_per_round": per_round_ratios("deferred"),
        "eager_ratio_per_round": per_round_ratios("eager"),
        "deferred_ratio_paired_median": paired_median("deferred"),
        "eager_ratio_paired_median": paired_median("eager"),
        "lookahead_ratio_paired_median": paired_median("lookahead"),
        "invariant_samples_per_s": (
            round(medians["invariant"], 1) if "invariant" in medians else None
        ),
        "invariant_vs_deferred": _paired_ratio(rounds, "invariant", "deferred"),
        "configs": per_config,
        "memory": {
            "peak_rss_mb": "max over samples of the summed RSS of main + DataLoader workers "
            "(shared pages counted per process: an upper bound)",
            "peak_pss_mb": (
                round(max(memory.peak_pss.values()) / 2**20, 1) if memory.peak_pss else None
            ),
            "main_maxrss_mb": round(usage_self, 1),
            "worker_maxrss_mb": round(usage_children, 1),
            "rss_interval_s": args.memory_interval,
            "pss_interval_s": args.pss_interval or None,
        },
        "settings": {
            "model": args.model,
            "image_size": list(bench.image_size),
            "context_length": bench.context_length,
            "kept_batch": bench.k,
            "superbatch": bench.n,
            "filter_ratio": args.filter_ratio,
            "iid_filter_ratio": 0.0,
            "policies": {
                "iid": "iid",
                "deferred": "diversity",
                "eager": "diversity",
                "lookahead": "diversity",
                "invariant": "diversity",
            },
            "world": _world(),
            "model_step_ms": args.model_step_ms,
            "workers": args.workers,
            "prefetch_factor": args.prefetch,
            "worker_decode_threads": 1,
            "main_decode_threads": bench.main_decoder.num_threads,
            "draft": bench.main_decoder.draft,
            "draft_margin": bench.main_decoder.draft_margin,
            "resampler": bench.main_decoder.resampler,
            "torch_threads_main": torch.get_num_threads(),
            "torch_threads_workers": 1,
            "warmup_steps": args.warmup,
            "timed_steps_per_round": args.steps,
            "rounds": args.rounds,
            "kept_samples_per_round": args.steps * bench.k,
            "order": "interleaved " + " ".join(args.configs) + " per round",
            "cpu_count": os.cpu_count(),
            "cpu_affinity": CPUS,
            "load_avg_1m_at_start": round(load_at_start, 2),
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
            "data": data_stats,
            "data_dir": str(data) if tmp is None else "temporary (removed)",
            "seed": args.seed,
            "consume": args.consume,
            "smoke": args.smoke,
        },
    }
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(line), flush=True)
    return line


def _paired_ratio(rounds: dict[str, list[dict[str, Any]]], config: str, base: str) -> float | None:
    """Median over rounds of ``config``'s samples/s over ``base``'s in the same round."""
    if config not in rounds or base not in rounds:
        return None
    ratios = [
        x["samples_per_s"] / b["samples_per_s"]
        for x, b in zip(rounds[config], rounds[base], strict=True)
    ]
    return round(statistics.median(ratios), 3)
