"""The closed sets of values that both a recipe and the library accept, each named once.

``config.py`` checks a recipe against them before torch, Composer or open_clip are imported
(docs/design.md#fail-early), and the classes that take the same values (the algorithm, the
model, the dataset) check their arguments against them too. So they live here, in a module
that imports nothing, rather than in either the light or the heavy side.
"""

from __future__ import annotations

__all__ = ["CAPTION_CHOICES", "DECODE_ERROR_MODES", "LOSSES", "check_caption"]

#: ``decode.on_error`` / ``ConceptAwareBatchSampling(on_decode_error=...)``: stop on a kept
#: image that cannot be decoded, or train on a stand-in (docs/selection.md#stand-ins).
DECODE_ERROR_MODES = ("raise", "replace")

#: ``model.loss`` / ``ComposerCLIP(loss=...)``: open_clip's ``ClipLoss`` or ``SigLipLoss``.
LOSSES = ("clip", "siglip")

#: ``train_data.caption`` / ``ConceptStreamingDataset(caption=...)`` besides a probability of
#: using the recaption.
CAPTION_CHOICES = ("caption", "recaption")


def check_caption(caption: str | float) -> str | float:
    """``caption`` checked: one of ``CAPTION_CHOICES`` or a probability in ``[0, 1]`` (a float).

    Raises ``ValueError`` (``TypeError`` for a value of another type) saying what is valid.
    """
    if isinstance(caption, str):
        if caption not in CAPTION_CHOICES:
            raise ValueError(
                f"caption={caption!r}: use caption, recaption or a probability "
                "in [0, 1] of using the recaption"
            )
        return caption
    if isinstance(caption, bool) or not isinstance(caption, int | float):
        raise TypeError(f"caption must be 'caption', 'recaption' or a float, got {caption!r}")
    if not 0.0 <= float(caption) <= 1.0:
        raise ValueError(f"caption probability must lie in [0, 1], got {caption}")
    return float(caption)
