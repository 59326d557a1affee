"""Deferred image decoding: decode and transform only the images the selection policy kept.

This is docs/design.md#deferred-decoding: the loader hands over encoded bytes, and after selection
``ImageDecoder`` turns the kept ``1 - f`` share into a normalised ``float32 [n, 3, H, W]`` tensor
with open_clip's own train or eval transform, in a thread pool (PIL releases the GIL while it
decodes and resizes). Two things differ from calling the open_clip transform on a full decode,
both on purpose:

**Deterministic augmentation.** torchvision's ``RandomResizedCrop`` draws from torch's global
RNG, which is shared by all threads and which Composer does not restore on resume. We draw the
crop instead with torchvision's own algorithm from ``numpy.random.default_rng([seed, step, rank,
i])`` (``i`` = position of the image in the call) and apply it with
``torchvision.transforms.functional``; the same (seed, step, rank, i) gives the same crop on any
machine, thread count or resumption. Transforms whose randomness we do not reproduce (colour
jitter, grayscale, timm pipelines) are refused at construction rather than silently made
nondeterministic.

**Reduced-size JPEG decoding.** libjpeg can decode at 1/2, 1/4 or 1/8 scale in the DCT domain
(PIL ``Image.draft``), several times faster than a full decode. We use the largest such factor
``r`` for which the region the transform reads keeps at least ``draft_margin`` (>= 1) times the
output resolution, so the transform only ever downsamples. With ``m = draft_margin``:

- eval, ``Resize(S)`` (shortest side) + ``CenterCrop``: ``min(W, H) / r >= m * S``;
  ``Resize((h, w))`` (squash): ``W / r >= m * w`` and ``H / r >= m * h``; ``ResizeKeepRatio``:
  ``r * m`` at most its resize ratio. Any other first step: no draft.
- train, ``RandomResizedCrop``: the crop ``(i, j, h, w)`` is drawn first, in ORIGINAL pixel
  coordinates (the size comes from the JPEG header, before decoding), then ``w / r >= m * out_w``
  and ``h / r >= m * out_h`` for that crop. Since the crop is known exactly, this needs no
  worst-case bound from the ``scale`` lower limit, and the crop is the same whether or not a
  draft is taken.
  The crop is read from the reduced image with a fractional box (``PIL.Image.resize(box=...)``),
  so it covers the same region of the photograph.

How much resolution to demand is a quality/speed trade. Reducing to exactly the output size
swaps the bicubic antialiasing filter for libjpeg's box-like DCT averaging: on grace_hopper.jpg
that differs from a full decode by 0.024-0.033 mean, 0.3-0.7 max (normalised units), as much as
PIL's own ``Image.reduce`` does, about twice the change of re-encoding the JPEG at quality 75.
So by default we keep a margin: ``draft_margin=1.5`` reduces only while the read region keeps
1.5x the output resolution, which brings the difference to about 0.01-0.017 mean and 0.12-0.21
at the 99.9th percentile (quality-75 re-encoding: 0.014 and 0.13) and still decodes a 1024x1200
JPEG about 1.8x (224 px output) to 3.5x (64 px) faster than a full decode.
``draft_margin=1.0`` is the fastest safe setting; ``draft=False, resampler="pil"`` gives
open_clip's result bit for bit. tests/test_decode.py checks the difference stays under 0.05 mean
and 0.5 at the 99.9th percentile.

**uint8 resampling and table normalisation.** open_clip resizes with PIL; by default
(``resampler="torch"``) we crop a view of the decoded image and resize it with torchvision's
native ``uint8`` antialiased bicubic kernel (``transforms.v2.functional.resize``), which costs
about a fifth of PIL's resize on 256-512 px JPEGs to 224 px and differs from it by at most 2 grey
levels, 0.001-0.004 levels on average (normalised: max 0.030, mean 0.00005; asserted in
tests/test_decode.py). Drafted JPEGs and ``ResizeKeepRatio`` still resize with PIL (fractional
boxes; PIL-only parameters). Normalisation is a lookup in a ``[3, 256]`` table computed with
``ToTensor`` + ``Normalize``'s own float32 arithmetic, fused with the HWC -> CHW transpose: the
same bits as computing it, at a third of the CPU.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
import open_clip
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
import torchvision.transforms.v2.functional as F2
from open_clip.transform import CenterCropOrPad, MaybeConvertMode, MaybeToTensor, ResizeKeepRatio
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

__all__ = [
    "DecodedImage",
    "ImageDecodeError",
    "ImageDecoder",
    "default_num_threads",
    "random_resized_crop_params",
]

#: JPEG DCT-domain reduction factors libjpeg supports, largest first.
DRAFT_FACTORS = (8, 4, 2, 1)
#: ``ImageDecoder(resampler=...)``: torchvision's ``uint8`` tensor kernels, or open_clip's PIL.
RESAMPLERS = ("torch", "pil")


class ImageDecodeError(ValueError):
    """An image that cannot be decoded; names the sample so the bad record can be found."""

    def __init__(self, key: str, cause: BaseException | str) -> None:
        self.key = key
        self.cause = cause
        super().__init__(
            f"cannot decode the image of sample {key!r}: {cause}; the stored bytes are not a "
            "readable image (re-convert the source, or drop the sample)"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Survive pickling across processes (DataLoader workers, distributed error reports).
        return (type(self), (self.key, str(self.cause)))


@dataclass(frozen=True)
class DecodedImage:
    """One decoded, geometrically transformed image, before normalisation.

    ``pixels`` is ``uint8 [H, W, 3]`` (RGB). ``source_size`` is the stored ``(width, height)``;
    ``draft_scale`` the JPEG reduction used (1 = full decode); ``crop`` the train crop
    ``(top, left, height, width)`` in source pixels (``None`` in eval).
    """

    pixels: np.ndarray
    source_size: tuple[int, int]
    draft_scale: int
    crop: tuple[int, int, int, int] | None


def default_num_threads() -> int:
    """Threads for decoding: the CPUs this process may use, capped at 16.

    PIL decodes and resizes without the GIL, so threads scale with cores until memory bandwidth
    and the DataLoader workers competing for the same cores take over.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(16, cpus))


def random_resized_crop_params(
    width: int,
    height: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    rng: np.random.Generator,
) -> tuple[int, int, int, int]:
    """Draw a ``RandomResizedCrop`` box ``(top, left, height, width)`` from ``rng``.

    The same algorithm as ``torchvision.transforms.RandomResizedCrop.get_params`` (10 tries at a
    random area share and log-uniform aspect ratio, then a centre crop), but with an explicit
    numpy generator instead of torch's global RNG, so results depend only on the generator seed.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(rng.integers(0, height - h + 1))
            j = int(rng.integers(0, width - w + 1))
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def normalization_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``float32 [3, 256]``: ``(v / 255 - mean[c]) / std[c]`` for every ``uint8`` value ``v``.

    Computed with ``ToTensor`` + ``Normalize``'s float32 operations in their order, so looking a
    pixel up gives the bits that computing it would.
    """
    values = torch.arange(256, dtype=torch.float32).div_(255)
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None]
    std_t = torch.tensor(std, dtype=torch.float32)[:, None]
    return ((values[None, :] - mean_t) / std_t).numpy()


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _normalize_lut(pixels: np.ndarray, table: np.ndarray, out: np.ndarray) -> None:
    """``out[c, y, x] = table[c, pixels[y, x, c]]``: normalise and transpose in one pass."""
    height, width, _ = pixels.shape
    for c in range(3):  # plane by plane: as fast on HWC input, and planar views read in order
        for y in range(height):
            for x in range(width):
                out[c, y, x] = table[c, pixels[y, x, c]]


def _largest_draft(limit: float) -> int:
    """Largest JPEG reduction factor ``r <= limit``."""
    return next(r for r in DRAFT_FACTORS if r <= limit or r == 1)


def _eval_draft_limit(step: Any, width: int, height: int) -> float:
    """Largest reduction that keeps the image at least as large as ``step`` resizes it to."""
    if isinstance(step, T.Resize) and step.max_size is None:
        size = step.size
        if isinstance(size, int) or len(size) == 1:
            target = size if isinstance(size, int) else size[0]
            return min(width, height) / target
        out_h, out_w = size
        return min(width / out_w, height / out_h)
    if (
        isinstance(step, ResizeKeepRatio)
        and not step.random_scale_prob
        and not step.random_aspect_prob
    ):
        target_h, target_w = step.size
        ratio_h, ratio_w = height / target_h, width / target_w
        return max(ratio_h, ratio_w) * step.longest + min(ratio_h, ratio_w) * (1.0 - step.longest)
    return 1.0


#: Eval steps that are deterministic PIL -> PIL functions we may run as they are.
_DETERMINISTIC_GEOMETRY = (T.Resize, T.CenterCrop, CenterCropOrPad, ResizeKeepRatio)


class ImageDecoder:
    """Decode and transform a list of encoded images with open_clip's train or eval transform.

    Build it for a model's preprocessing (``from_model``, ``from_model_name``,
    ``from_preprocess_cfg``) or from ``open_clip.image_transform`` arguments; call it with the
    kept images' bytes and keys to get ``float32 [n, 3, H, W]`` on ``device``. Safe to call from
    one thread at a time; the thread pool is created lazily and is not pickled.

    Args:
        image_size: model input size, ``int`` or ``(height, width)``.
        is_train: train transform (``RandomResizedCrop`` with ``aug_cfg.scale``) or eval
            (resize + centre crop).
        mean, std, interpolation, resize_mode, fill_color, aug_cfg: passed to
            ``open_clip.image_transform``.
        seed: augmentation seed; the crop of image ``i`` in a call with ``step`` and ``rank`` is
            drawn from ``numpy.random.default_rng([seed, step, rank, i])``.
        num_threads: decoding threads (``default_num_threads()`` when ``None``).
        draft: use reduced-size JPEG decoding where it is safe (see the module docs).
        draft_margin: resolution the read region must keep, as a multiple of the output size,
            before a JPEG is decoded reduced (>= 1; 1 is fastest, larger is closer to a full
            decode; see the module docs for measured differences).
        device: where the output tensor goes. Images are moved as ``uint8`` and normalised
            there, which is 4x less host-to-device traffic than moving floats.
        resampler: ``"torch"`` (default): torchvision's ``uint8`` antialiased resize, within
            2 grey levels of open_clip's and about 5x cheaper; ``"pil"``: open_clip's own PIL
            resize, bit for bit (see the module docs).
    """

    def __init__(
        self,
        image_size: int | tuple[int, int] = 224,
        *,
        is_train: bool,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        interpolation: str | None = None,
        resize_mode: str | None = None,
        fill_color: int = 0,
        aug_cfg: dict[str, Any] | open_clip.AugmentationCfg | None = None,
        seed: int = 0,
        num_threads: int | None = None,
        draft: bool = True,
        draft_margin: float = 1.5,
        device: str | torch.device = "cpu",
        resampler: str = "torch",
    ) -> None:
        if seed < 0:
            raise ValueError(f"seed must be non-negative (numpy seeds), got {seed}")
        if resampler not in RESAMPLERS:
            raise ValueError(f"resampler must be one of {RESAMPLERS}, got {resampler!r}")
        self.resampler = resampler
        if draft_margin < 1.0:
            raise ValueError(f"draft_margin must be >= 1 (1 = no margin), got {draft_margin}")
        self.is_train = is_train
        self.seed = int(seed)
        self.num_threads = num_threads or default_num_threads()
        self.draft = draft
        self.draft_margin = float(draft_margin)
        self.device = torch.device(device)
        self.transform = open_clip.image_transform(
            image_size,
            is_train=is_train,
            mean=tuple(mean) if mean is not None else None,
            std=tuple(std) if std is not None else None,
            resize_mode=resize_mode,
            interpolation=interpolation,
            fill_color=fill_color,
            aug_cfg=aug_cfg,
        )
        self._compile(self.transform)
        self._pool: ThreadPoolExecutor | None = None

    # ----------------------------------------------------------------------------------------
    # Construction helpers
    # ----------------------------------------------------------------------------------------

    @classmethod
    def from_preprocess_cfg(
        cls, cfg: dict[str, Any], *, is_train: bool, **kwargs: Any
    ) -> ImageDecoder:
        """Build from an open_clip preprocess dict (``open_clip.get_model_preprocess_cfg``)."""
        keys = ("mean", "std", "interpolation", "resize_mode", "fill_color")
        args = {k: cfg[k] for k in keys if cfg.get(k) is not None}
        args.update(kwargs)
        return cls(cfg.get("size", 224), is_train=is_train, **args)

    @classmethod
    def from_model(cls, model: torch.nn.Module, *, is_train: bool, **kwargs: Any) -> ImageDecoder:
        """Build for an open_clip model's own preprocessing (size, mean, std, interpolation)."""
        cfg = open_clip.get_model_preprocess_cfg(model)
        return cls.from_preprocess_cfg(cfg, is_train=is_train, **kwargs)

    @classmethod
    def from_model_name(cls, name: str, *, is_train: bool, **kwargs: Any) -> ImageDecoder:
        """Build for an open_clip architecture name (``"ViT-B-32"``): its image size, OpenAI stats.

        Pretrained tags may use other mean/std (e.g. SigLIP's 0.5); pass them, or use
        ``from_model`` on the created model, which knows them.
        """
        config = open_clip.get_model_config(name)
        if config is None:
            raise ValueError(
                f"unknown open_clip model {name!r}; see open_clip.list_models() or register it "
                "with open_clip.add_model_config"
            )
        cfg = dict(config.get("preprocess_cfg") or {})
        cfg.setdefault("size", config["vision_cfg"]["image_size"])
        return cls.from_preprocess_cfg(cfg, is_train=is_train, **kwargs)

    def _compile(self, transform: T.Compose) -> None:
        """Split open_clip's Compose into geometry (run per image) and normalisation (batched)."""
        steps = list(transform.transforms)
        normalize = steps[-1] if steps and isinstance(steps[-1], T.Normalize) else None
        if normalize is None:
            raise NotImplementedError(
                f"expected an open_clip transform ending in Normalize: {transform}"
            )
        body = steps[:-1]
        if body and isinstance(body[-1], MaybeToTensor | T.ToTensor):
            body = body[:-1]
        body = [s for s in body if not isinstance(s, MaybeConvertMode)]  # we decode to RGB
        self._crop: T.RandomResizedCrop | None = None
        self._geometry: list[Any] = []
        self._torch_geometry_ok = True  # train: RandomResizedCrop is crop + resize
        if self.is_train:
            if len(body) != 1 or not isinstance(body[0], T.RandomResizedCrop):
                raise NotImplementedError(
                    f"deterministic augmentation supports open_clip's RandomResizedCrop train "
                    f"transform only (no colour jitter, grayscale or timm); got {transform}"
                )
            self._crop = body[0]
            self.output_size: tuple[int, int] = tuple(self._crop.size)  # (h, w)
        else:
            for step in body:
                if not isinstance(step, _DETERMINISTIC_GEOMETRY) or (
                    isinstance(step, ResizeKeepRatio)
                    and (step.random_scale_prob or step.random_aspect_prob)
                ):
                    raise NotImplementedError(f"unsupported eval transform step {step!r}")
            self._geometry = body
            self._torch_geometry_ok = all(
                isinstance(step, T.Resize | T.CenterCrop | CenterCropOrPad) for step in body
            )
            last = body[-1] if body else None
            size = getattr(last, "size", None)
            if size is None:
                raise NotImplementedError(f"eval transform has no fixed output size: {transform}")
            self.output_size = (size, size) if isinstance(size, int) else tuple(size)
            if len(self.output_size) == 1:
                self.output_size = (self.output_size[0], self.output_size[0])
        self.mean = torch.tensor(normalize.mean, dtype=torch.float32)
        self.std = torch.tensor(normalize.std, dtype=torch.float32)
        self._lut = normalization_table(normalize.mean, normalize.std)

    # ----------------------------------------------------------------------------------------
    # Per image
    # ----------------------------------------------------------------------------------------

    def _rng(self, step: int, rank: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, step, rank, index])

    def decode_one(
        self, data: bytes, key: str, *, step: int = 0, rank: int = 0, index: int = 0
    ) -> DecodedImage:
        """Decode and geometrically transform one image (no normalisation); see ``__call__``."""
        try:
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            crop = None
            if self._crop is not None:
                crop = random_resized_crop_params(
                    width, height, self._crop.scale, self._crop.ratio, self._rng(step, rank, index)
                )
                out_h, out_w = self.output_size
                limit = min(crop[3] / out_w, crop[2] / out_h)
            else:
                limit = _eval_draft_limit(self._geometry[0], width, height) if self._geometry else 1
            scale = 1
            if self.draft and img.format == "JPEG":
                r = _largest_draft(limit / self.draft_margin)
                if r > 1:
                    drafted = img.draft("RGB", (width // r, height // r))
                    if drafted is not None:
                        scale = round(width / drafted[1][2])
            if self.resampler == "torch" and scale == 1 and self._torch_geometry_ok:
                if img.format == "JPEG" and img.mode == "RGB":
                    # libjpeg-turbo straight into a [3, H, W] tensor: the same pixels as PIL's
                    # decode (asserted in the tests) without PIL's copy into numpy.
                    chw = decode_jpeg(
                        torch.frombuffer(bytearray(data), dtype=torch.uint8),
                        mode=ImageReadMode.RGB,
                    )
                else:
                    img.load()
                    rgb = img if img.mode == "RGB" else img.convert("RGB")
                    chw = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)
                pixels = self._torch_geometry(chw, crop)
                if chw.shape[1:] != (height, width):
                    raise ImageDecodeError(
                        key, f"decoded {tuple(chw.shape[1:])} pixels, header says {height, width}"
                    )
                return DecodedImage(pixels, (width, height), scale, crop)
            img.load()
            if img.mode != "RGB":
                img = img.convert("RGB")
            if crop is not None:
                pixels = np.asarray(self._apply_crop(img, crop, scale), dtype=np.uint8)
            else:
                for geometry_step in self._geometry:
                    img = geometry_step(img)
                pixels = np.asarray(img, dtype=np.uint8)
        except ImageDecodeError:
            raise
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... on bad data
            raise ImageDecodeError(key, err) from err
        expected = (*self.output_size, 3)
        if pixels.shape != expected:
            raise ImageDecodeError(key, f"transform produced {pixels.shape}, expected {expected}")
        return DecodedImage(pixels, (width, height), scale, crop)

    def _torch_geometry(
        self, x: torch.Tensor, crop: tuple[int, int, int, int] | None
    ) -> np.ndarray:
        """Crop and resize ``uint8 [3, H, W]`` with torchvision's native ``uint8`` kernels.

        The crop is a view, and ``torchvision.transforms.v2.functional.resize`` resamples
        ``uint8`` directly (no float round trip), about 4-5x less CPU than PIL's resize on the
        benchmark's images; it releases the GIL, so the decode threads scale like PIL's. The
        result is returned as an ``[H, W, 3]`` view of the planar output (no copy):
        :meth:`normalize_into` reads it plane by plane.
        """
        if crop is not None:
            assert self._crop is not None
            top, left, h, w = crop
            x = F2.resize(
                x[:, top : top + h, left : left + w],
                list(self.output_size),
                interpolation=self._crop.interpolation,
                antialias=True,
            )
        else:
            for step in self._geometry:
                if isinstance(step, T.Resize):
                    x = F2.resize(
                        x,
                        step.size,
                        interpolation=step.interpolation,
                        max_size=step.max_size,
                        antialias=True,
                    )
                else:  # CenterCrop, CenterCropOrPad: slicing and padding, exact on tensors
                    x = step(x)
        return x.permute(1, 2, 0).numpy()

    def _apply_crop(
        self, img: Image.Image, crop: tuple[int, int, int, int], scale: int
    ) -> Image.Image:
        assert self._crop is not None
        top, left, h, w = crop
        out_h, out_w = self.output_size
        if scale == 1:
            # Exactly what torchvision's RandomResizedCrop does with these parameters.
            return F.resized_crop(
                img,
                top,
                left,
                h,
                w,
                [out_h, out_w],
                self._crop.interpolation,
                antialias=self._crop.antialias,
            )
        # The reduced image's pixel k covers source pixels [k * scale, (k + 1) * scale): read the
        # same region through a fractional box so the crop does not shift by rounding.
        box = (left / scale, top / scale, (left + w) / scale, (top + h) / scale)
        resample = F.pil_modes_mapping[self._crop.interpolation]
        return img.resize((out_w, out_h), resample=resample, box=box)

    # ----------------------------------------------------------------------------------------
    # Batches
    # ----------------------------------------------------------------------------------------

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="cabs-decode")
        return self._pool

    def decode_pixels(
        self,
        images: Sequence[bytes],
        keys: Sequence[str],
        *,
        step: int = 0,
        rank: int = 0,
        errors: str = "raise",
        out: torch.Tensor | None = None,
        crop_keys: Sequence[int] | None = None,
    ) -> list[Any]:
        """Decode ``images`` in the thread pool, in order, into ``DecodedImage`` s.

        Image ``i``'s train crop is seeded by ``(seed, step, rank, i)``, or, with ``crop_keys``,
        by ``(seed, step, crop_keys[i], 0)``: keyed by the sample (world-invariant selection
        passes global sample indices), so it does not depend on the rank or slot it lands in.

        ``errors="raise"``: the first bad image raises ``ImageDecodeError`` naming its key.
        ``errors="return"``: a bad image's slot holds its ``ImageDecodeError`` instead, so the
        caller can replace it (``decode.on_error: replace``) without losing the others' work.
        ``out`` (from :meth:`output_buffer`): each thread also normalises its image into row
        ``i`` right after decoding it, while its pixels are still in cache; this is how the CPU
        path builds the model's batch without a serial pass over it.

        This is the hook for other decoders: a GPU path (``torchvision.io.decode_jpeg(...,
        device='cuda')``) would replace this per-image CPU step and hand ``uint8`` images to
        the same normalisation.
        """
        if len(images) != len(keys):
            raise ValueError(f"got {len(images)} images but {len(keys)} keys")
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        if out is not None and out.shape[0] != len(images):
            raise ValueError(f"out has {out.shape[0]} rows for {len(images)} images")
        if crop_keys is not None and len(crop_keys) != len(images):
            raise ValueError(f"got {len(crop_keys)} crop keys for {len(images)} images")
        call = self.decode_one if errors == "raise" else self.decode_or_error
        seeds = (
            [(rank, i) for i in range(len(images))]
            if crop_keys is None
            else [(int(c), 0) for c in crop_keys]
        )
        tasks = [
            (call, images[i], keys[i], *seeds[i], None if out is None else out[i])
            for i in range(len(images))
        ]
        if len(images) <= 1 or self.num_threads == 1:
            return [self._run(*task, step=step) for task in tasks]
        pool = self._executor()
        futures = [pool.submit(self._run, *task, step=step) for task in tasks]
        return [f.result() for f in futures]

    def _run(
        self,
        call: Any,
        data: bytes,
        key: str,
        rank: int,
        index: int,
        row: torch.Tensor | None,
        *,
        step: int,
    ) -> Any:
        result = call(data, key, step=step, rank=rank, index=index)
        if row is not None and isinstance(result, DecodedImage):
            self.normalize_into(row, result.pixels)
        return result

    def decode_or_error(
        self,
        data: bytes,
        key: str,
        *,
        step: int,
        rank: int,
        index: int,
        row: torch.Tensor | None = None,
    ) -> DecodedImage | ImageDecodeError:
        """``decode_one``, with a bad image's ``ImageDecodeError`` returned instead of raised.

        ``row``: also normalise the image into this row of an :meth:`output_buffer`.
        """
        try:
            result = self.decode_one(data, key, step=step, rank=rank, index=index)
        except ImageDecodeError as err:
            return err
        if row is not None:
            self.normalize_into(row, result.pixels)
        return result

    def output_buffer(self, n: int) -> torch.Tensor | None:
        """An uninitialised ``float32 [n, 3, H, W]`` batch to decode into on CPU; None on a GPU.

        On a GPU the ``uint8`` images are copied over (4x less traffic than floats) and
        normalised there by :meth:`to_tensor` instead.
        """
        if self.device.type != "cpu":
            return None
        return torch.empty((n, 3, *self.output_size), dtype=torch.float32)

    def to_tensor(self, decoded: Sequence[DecodedImage]) -> torch.Tensor:
        """Stack decoded images and normalise them on ``device``: ``float32 [n, 3, H, W]``."""
        out_h, out_w = self.output_size
        if not decoded:
            return torch.empty((0, 3, out_h, out_w), dtype=torch.float32, device=self.device)
        pixels = torch.from_numpy(np.stack([d.pixels for d in decoded]))
        if self.device.type == "cuda":
            pixels = pixels.pin_memory()
        return self.normalize(pixels.to(self.device, non_blocking=True))

    def normalize_into(self, row: torch.Tensor, pixels: np.ndarray) -> None:
        """``uint8 [H, W, 3]`` into the CPU ``float32 [3, H, W]`` view ``row``.

        A lookup in :func:`normalization_table` (256 values per channel, computed with the
        arithmetic of :meth:`normalize`, so the result is the same bit for bit), fused with the
        HWC -> CHW transpose in one compiled pass that releases the GIL: about 3x less CPU than
        the three numpy passes (divide, subtract, divide) it replaces.
        """
        _normalize_lut(pixels, self._lut, row.numpy())

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """``uint8 [n, H, W, 3]`` -> normalised ``float32 [n, 3, H, W]``, on ``pixels.device``.

        Same arithmetic as ``ToTensor`` + ``Normalize`` (divide by 255, subtract mean, divide by
        std), so an undrafted eval image matches open_clip's transform bit for bit.
        """
        mean = self.mean.to(pixels.device)
        std = self.std.to(pixels.device)
        x = pixels.to(torch.float32).div_(255).sub_(mean).div_(std)
        return x.permute(0, 3, 1, 2).contiguous()

    def __call__(
        self, images: Sequence[bytes], keys: Sequence[str], *, step: int = 0, rank: int = 0
    ) -> torch.Tensor:
        """Decode, transform and normalise ``images`` into ``float32 [n, 3, H, W]`` on ``device``.

        ``step`` and ``rank`` seed the train augmentation together with ``seed``; pass the
        trainer's batch index and the global rank so that every step and rank crops differently
        and a resumed run crops exactly as the uninterrupted one.
        """
        out = self.output_buffer(len(images))
        decoded = self.decode_pixels(images, keys, step=step, rank=rank, out=out)
        return out if out is not None else self.to_tensor(decoded)

    def close(self) -> None:
        """Stop the decoding threads (they are also stopped at interpreter exit)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> ImageDecoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_pool"] = None
        return state

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(output_size={self.output_size}, is_train={self.is_train}, "
            f"seed={self.seed}, num_threads={self.num_threads}, draft={self.draft}, "
            f"resampler={self.resampler!r}, device={self.device})"
        )
