"""Deferred decoding: open_clip transforms on kept images only, deterministic and draft-accelerated.

Real photographs: matplotlib's grace_hopper.jpg (512x600; matplotlib is a dependency of
mosaicml-streaming) and the embedded sample's JPEGs.
"""

from __future__ import annotations

import io
import math
import pickle

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from paths import PHOTO, SAMPLE
from PIL import Image

from cabs_streaming.decode import (
    DecodedImage,
    ImageDecodeError,
    ImageDecoder,
    random_resized_crop_params,
)

# Draft vs full decode, normalised units (1 grey level is about 0.015).
MEAN_TOL = 0.05
P999_TOL = 0.5
MAX_TOL = 1.0
# The default resampler="torch" (torchvision's uint8 antialiased resize) vs open_clip's PIL
# transform, no draft, in uint8 grey levels before normalisation. Measured on these images and
# on the pipeline benchmark's JPEGs at 64-224 px: max 2 levels, mean 0.001-0.004 levels (in
# normalised units: max 0.030, mean 0.00005).
RESAMPLE_MAX_LEVELS = 2
RESAMPLE_MEAN_LEVELS = 0.01


@pytest.fixture(scope="module")
def photo() -> bytes:
    """The photograph as stored (512x600 baseline JPEG)."""
    return PHOTO.read_bytes()


@pytest.fixture(scope="module")
def photo_512x384(photo: bytes) -> bytes:
    """A 512x384 JPEG cut from the photograph, re-encoded at quality 90."""
    img = Image.open(io.BytesIO(photo)).convert("RGB").crop((0, 100, 512, 484))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _full_decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def _train_reference(decoder: ImageDecoder, data: bytes, crop: tuple[int, int, int, int]):
    """Plain PIL decode + torchvision resized_crop with the same box + ToTensor + Normalize."""
    rrc = decoder._crop
    img = F.resized_crop(
        _full_decode(data), *crop, list(rrc.size), rrc.interpolation, antialias=rrc.antialias
    )
    normalize = decoder.transform.transforms[-1]
    return normalize(F.to_tensor(img))


def _assert_close_to_full_decode(out: torch.Tensor, ref: torch.Tensor) -> None:
    diff = (out - ref).abs().flatten()
    assert diff.mean().item() < MEAN_TOL, diff.mean()
    assert diff.quantile(0.999).item() < P999_TOL, diff.quantile(0.999)
    assert diff.max().item() < MAX_TOL, diff.max()


def test_eval_without_draft_is_open_clip_transform_bit_for_bit(photo: bytes) -> None:
    decoder = ImageDecoder(224, is_train=False, draft=False, resampler="pil")
    out = decoder([photo], ["k"])
    assert out.shape == (1, 3, 224, 224) and out.dtype == torch.float32
    assert torch.equal(out[0], decoder.transform(_full_decode(photo)))


@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("name", ["photo", "photo_512x384"])
def test_eval_draft_matches_full_decode_within_tolerance(
    size: int, name: str, request: pytest.FixtureRequest
) -> None:
    data = request.getfixturevalue(name)
    decoder = ImageDecoder(size, is_train=False)
    assert decoder.decode_one(data, "k").draft_scale > 1  # the reduced decode is really taken
    _assert_close_to_full_decode(decoder([data], ["k"])[0], decoder.transform(_full_decode(data)))


def test_draft_margin_one_is_faster_path_and_still_within_tolerance(photo: bytes) -> None:
    decoder = ImageDecoder(64, is_train=False, draft_margin=1.0)
    decoded = decoder.decode_one(photo, "k")
    assert decoded.draft_scale == 8  # 512 / 8 = 64: exactly the output resolution
    _assert_close_to_full_decode(decoder([photo], ["k"])[0], decoder.transform(_full_decode(photo)))


def test_draft_never_reduces_below_output_resolution(photo_512x384: bytes) -> None:
    # Short side 384: for 224 output a 1/2 decode (192) would be too small, even without margin.
    decoder = ImageDecoder(224, is_train=False, draft_margin=1.0)
    assert decoder.decode_one(photo_512x384, "k").draft_scale == 1
    decoder = ImageDecoder(192, is_train=False, draft_margin=1.0)
    assert decoder.decode_one(photo_512x384, "k").draft_scale == 2


def test_draft_is_off_when_disabled_and_for_png(photo: bytes) -> None:
    assert ImageDecoder(64, is_train=False, draft=False).decode_one(photo, "k").draft_scale == 1
    buf = io.BytesIO()
    _full_decode(photo).save(buf, format="PNG")
    assert ImageDecoder(64, is_train=False).decode_one(buf.getvalue(), "k").draft_scale == 1


def test_train_draft_matches_full_decode_with_the_same_crop(photo: bytes) -> None:
    decoder = ImageDecoder(64, is_train=True, aug_cfg={"scale": (0.3, 1.0)}, seed=3)
    drafted = 0
    for step in range(6):
        decoded = decoder.decode_one(photo, "k", step=step)
        drafted += decoded.draft_scale > 1
        out = decoder([photo], ["k"], step=step)[0]
        _assert_close_to_full_decode(out, _train_reference(decoder, photo, decoded.crop))
    assert drafted == 6


def test_train_without_draft_is_torchvision_resized_crop_bit_for_bit(photo: bytes) -> None:
    decoder = ImageDecoder(96, is_train=True, draft=False, seed=5, resampler="pil")
    for step in range(3):
        crop = decoder.decode_one(photo, "k", step=step).crop
        out = decoder([photo], ["k"], step=step)[0]
        assert torch.equal(out, _train_reference(decoder, photo, crop))


def _sample_images(n: int) -> list[bytes]:
    from cabs_streaming.dataset import ConceptStreamingDataset

    dataset = ConceptStreamingDataset(local=str(SAMPLE / "train"))
    images = [dataset[i]["image"] for i in range(n)]
    del dataset
    return images


def _open_clip_pixels(decoder: ImageDecoder, data: bytes, decoded: DecodedImage) -> np.ndarray:
    """open_clip's own geometry (PIL), as uint8 ``[H, W, 3]``, for the crop ``decoded`` took."""
    img = _full_decode(data)
    if decoded.crop is not None:
        rrc = decoder._crop
        img = F.resized_crop(img, *decoded.crop, list(rrc.size), rrc.interpolation, antialias=True)
    else:
        for step in decoder.transform.transforms[:2]:  # Resize, CenterCrop
            img = step(img)
    return np.asarray(img)


@pytest.mark.parametrize("is_train", [False, True])
@pytest.mark.parametrize("size", [224, 64])
def test_torch_resampler_is_within_stated_tolerance_of_open_clip_transform(
    photo: bytes, photo_512x384: bytes, is_train: bool, size: int
) -> None:
    images = [photo, photo_512x384, *_sample_images(4)]  # 64 px sample images: upsampling
    fast = ImageDecoder(size, is_train=is_train, draft=False, seed=5)
    assert fast.resampler == "torch"  # the default
    slow = ImageDecoder(size, is_train=is_train, draft=False, seed=5, resampler="pil")
    levels = []
    for i, data in enumerate(images):
        decoded = fast.decode_one(data, "k", step=1, index=i)
        reference = _open_clip_pixels(fast, data, decoded)
        assert np.array_equal(slow.decode_one(data, "k", step=1, index=i).pixels, reference)
        levels.append(np.abs(decoded.pixels.astype(np.int16) - reference).ravel())
    levels = np.concatenate(levels)
    assert levels.max() <= RESAMPLE_MAX_LEVELS, levels.max()
    assert levels.mean() <= RESAMPLE_MEAN_LEVELS, levels.mean()
    assert levels.max() > 0  # really a different resampler: the comparison is not vacuous
    # The same bound on the normalised batch: at most 2 levels / (255 * smallest std).
    out = fast(images, [str(i) for i in range(len(images))], step=1)
    ref = slow(images, [str(i) for i in range(len(images))], step=1)
    bound = RESAMPLE_MAX_LEVELS / (255 * fast.std.min().item()) + 1e-6
    assert (out - ref).abs().max().item() <= bound


def test_lookup_table_normalisation_equals_arithmetic_bit_for_bit() -> None:
    decoder = ImageDecoder(16, is_train=False, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    values = np.arange(256 * 3, dtype=np.int64).reshape(16, 16, 3)
    pixels = np.ascontiguousarray((values * 7919 % 256).astype(np.uint8))
    assert all(len(np.unique(pixels[..., c])) == 256 for c in range(3))  # every value
    row = torch.empty(3, 16, 16)
    decoder.normalize_into(row, pixels)
    expected = decoder.normalize(torch.from_numpy(pixels)[None])[0]
    assert torch.equal(row, expected)
    assert torch.equal(expected, T.Normalize(decoder.mean, decoder.std)(F.to_tensor(pixels)))


def test_unknown_resampler_is_rejected() -> None:
    with pytest.raises(ValueError, match="resampler must be one of"):
        ImageDecoder(64, is_train=False, resampler="cv2")


def test_train_crop_is_drawn_from_seed_step_rank_and_position(photo: bytes) -> None:
    images, keys = [photo] * 3, ["a", "b", "c"]
    first = ImageDecoder(64, is_train=True, seed=11)
    again = ImageDecoder(64, is_train=True, seed=11, num_threads=1)
    out = first(images, keys, step=4, rank=1)
    assert torch.equal(out, again(images, keys, step=4, rank=1))
    assert not torch.equal(out[0], out[1])  # position in the call matters
    assert not torch.equal(out, first(images, keys, step=5, rank=1))
    assert not torch.equal(out, first(images, keys, step=4, rank=0))
    assert not torch.equal(
        out, ImageDecoder(64, is_train=True, seed=12)(images, keys, step=4, rank=1)
    )


def test_train_crop_ignores_torch_global_rng(photo: bytes) -> None:
    decoder = ImageDecoder(64, is_train=True, seed=0)
    torch.manual_seed(1)
    a = decoder([photo], ["k"], step=2)
    torch.manual_seed(2)
    b = decoder([photo], ["k"], step=2)
    assert torch.equal(a, b)


def test_random_resized_crop_params_respect_scale_ratio_and_bounds() -> None:
    scale, ratio = (0.3, 1.0), (3 / 4, 4 / 3)
    for seed in range(200):
        top, left, h, w = random_resized_crop_params(
            512, 600, scale, ratio, np.random.default_rng(seed)
        )
        assert 0 <= top and 0 <= left and top + h <= 600 and left + w <= 512
        assert 0.3 * 0.97 <= h * w / (512 * 600) <= 1.0
        assert math.log(3 / 4) - 0.05 <= math.log(w / h) <= math.log(4 / 3) + 0.05


@pytest.mark.parametrize(
    "decoder",
    [
        ImageDecoder(64, is_train=False),  # drafted JPEG: PIL
        ImageDecoder(224, is_train=False, draft=False),  # full JPEG: torchvision decode_jpeg
        ImageDecoder(224, is_train=True, draft=False, resampler="pil"),
    ],
    ids=["draft", "torch", "pil"],
)
def test_undecodable_bytes_raise_an_error_naming_the_key(
    photo: bytes, decoder: ImageDecoder
) -> None:
    for bad in (b"not an image at all", photo[: len(photo) // 3], photo[:-10], b""):
        with pytest.raises(ImageDecodeError, match="sample-bad") as info:
            decoder([photo, bad], ["sample-ok", "sample-bad"])
        assert isinstance(info.value, ValueError)
        assert info.value.key == "sample-bad"
    err = pickle.loads(pickle.dumps(ImageDecodeError("k1", OSError("broken"))))
    assert err.key == "k1" and "broken" in str(err)


def test_non_rgb_images_decode_to_three_channels(photo: bytes) -> None:
    base = _full_decode(photo).resize((128, 150))
    encoded = []
    for mode, fmt in (("L", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG")):
        buf = io.BytesIO()
        base.convert(mode).save(buf, format=fmt)
        encoded.append(buf.getvalue())
    out = ImageDecoder(64, is_train=False)(encoded, ["l", "rgba", "p", "cmyk"])
    assert out.shape == (4, 3, 64, 64) and torch.isfinite(out).all()


def test_empty_input_gives_an_empty_batch() -> None:
    out = ImageDecoder(64, is_train=True)([], [])
    assert out.shape == (0, 3, 64, 64) and out.dtype == torch.float32


def test_mismatched_keys_are_rejected(photo: bytes) -> None:
    with pytest.raises(ValueError, match="2 images but 1 keys"):
        ImageDecoder(64, is_train=False)([photo, photo], ["k"])


def test_decode_one_returns_uint8_pixels_and_source_size(photo: bytes) -> None:
    decoded = ImageDecoder(64, is_train=False).decode_one(photo, "k")
    assert isinstance(decoded, DecodedImage)
    assert decoded.pixels.dtype == np.uint8 and decoded.pixels.shape == (64, 64, 3)
    assert decoded.source_size == (512, 600) and decoded.crop is None


def test_builds_for_a_model_name_and_a_model_preprocess_cfg() -> None:
    decoder = ImageDecoder.from_model_name("ViT-B-32", is_train=False)
    assert decoder.output_size == (224, 224)
    cfg = {"size": 96, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear"}
    decoder = ImageDecoder.from_preprocess_cfg(cfg, is_train=True)
    assert decoder.output_size == (96, 96)
    assert torch.equal(decoder.mean, torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="unknown open_clip model"):
        ImageDecoder.from_model_name("no-such-model", is_train=False)


def test_non_square_and_other_eval_resize_modes(photo: bytes) -> None:
    for kwargs, size in (
        ({"image_size": (64, 48)}, (64, 48)),
        ({"image_size": 64, "resize_mode": "squash"}, (64, 64)),
        ({"image_size": 64, "resize_mode": "longest"}, (64, 64)),
    ):
        decoder = ImageDecoder(is_train=False, **kwargs)
        out = decoder([photo], ["k"])
        assert out.shape == (1, 3, *size)
        _assert_close_to_full_decode(out[0], decoder.transform(_full_decode(photo)))


def test_random_transforms_it_cannot_reproduce_are_refused() -> None:
    with pytest.warns(UserWarning):  # open_clip warns about the unused timm-style keys
        with pytest.raises(NotImplementedError, match="RandomResizedCrop"):
            ImageDecoder(
                64,
                is_train=True,
                aug_cfg={"color_jitter": (0.4, 0.4, 0.4, 0.1), "color_jitter_prob": 0.8},
            )


def test_decoder_pickles_without_its_thread_pool(photo: bytes) -> None:
    decoder = ImageDecoder(64, is_train=True, num_threads=2)
    a = decoder([photo, photo], ["a", "b"], step=1)
    clone = pickle.loads(pickle.dumps(decoder))
    assert torch.equal(a, clone([photo, photo], ["a", "b"], step=1))
    decoder.close()
    clone.close()


def test_embedded_sample_images_match_the_open_clip_eval_transform() -> None:
    from cabs_streaming.dataset import ConceptStreamingDataset

    dataset = ConceptStreamingDataset(local=str(SAMPLE / "train"))
    samples = [dataset[i] for i in range(8)]
    images, keys = [s["image"] for s in samples], [s["key"] for s in samples]
    decoder = ImageDecoder(64, is_train=False, draft=False, resampler="pil")
    out = decoder(images, keys)
    for i, data in enumerate(images):
        assert torch.equal(out[i], decoder.transform(_full_decode(data)))
    del dataset


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_output_matches_cpu(photo: bytes) -> None:
    cpu = ImageDecoder(64, is_train=True, seed=1)
    cuda = ImageDecoder(64, is_train=True, seed=1, device="cuda")
    out = cuda([photo] * 4, list("abcd"), step=3)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), cpu([photo] * 4, list("abcd"), step=3))


def test_context_manager_stops_the_thread_pool(photo: bytes) -> None:
    with ImageDecoder(64, is_train=False, num_threads=2) as decoder:
        decoder([photo] * 4, list("abcd"))
        assert decoder._pool is not None
    assert decoder._pool is None
