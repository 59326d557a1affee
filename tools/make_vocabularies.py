#!/usr/bin/env python
"""Regenerate the tagging vocabularies shipped in ``cabs_streaming/vocabularies/``.

Why this exists: ``--tag-captions`` needs a concept list to be useful out of the box, and the
installed packages already hold two well-known ones. Nothing is downloaded; the files are written
from what ``open_clip`` and ``torchvision`` contain, so anyone can check and rebuild them:

* ``imagenet1k.txt``: the 1,000 ImageNet-1k class names as cleaned for zero-shot CLIP in
  ``open_clip.IMAGENET_CLASSNAMES`` (open_clip, MIT licence). Two names appear twice there
  ("missile", "sunglasses": ImageNet has two classes each that no caption can tell apart), so the
  file has 998 concepts. Synonyms: the parts of names written "a / b" or "a (note)", and
  torchvision's ImageNet category names (``ResNet50_Weights.DEFAULT.meta["categories"]``,
  torchvision, BSD-3-Clause) where they differ and have more than one word (single words such
  as "kite" or "Newfoundland" are too ambiguous in captions) and belong to no other class.
* ``coco.txt``: the 80 COCO detection categories from torchvision's detection weights metadata
  (``FasterRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"]`` without "N/A" and
  "__background__"; torchvision, BSD-3-Clause; the category names are COCO's, whose annotations
  are CC BY 4.0). The synonyms are this project's own everyday words for them (Apache-2.0).

Usage::

    python tools/make_vocabularies.py            # rewrite cabs_streaming/vocabularies/*.txt
    python tools/make_vocabularies.py --out DIR  # write elsewhere (the tests compare the two)
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

from cabs_streaming.tagging import TaggingVocabulary, normalise

ROOT = Path(__file__).resolve().parents[1]

#: Our own everyday words for the COCO categories (alt-text rarely says "sports ball").
COCO_SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": ("man", "woman", "boy", "girl", "child", "kid", "baby", "toddler", "guy", "lady",
               "gentleman", "pedestrian"),
    "bicycle": ("bike",),
    "car": ("automobile", "sedan", "taxi"),
    "motorcycle": ("motorbike", "moped"),
    "airplane": ("aeroplane", "plane", "jet", "airliner"),
    "train": ("locomotive",),
    "truck": ("lorry", "pickup truck"),
    "boat": ("ship", "sailboat", "yacht", "canoe", "kayak", "ferry"),
    "traffic light": ("traffic signal", "stoplight"),
    "fire hydrant": ("hydrant",),
    "cat": ("kitten", "kitty"),
    "dog": ("puppy", "pup", "doggy"),
    "horse": ("pony", "foal"),
    "sheep": ("lamb",),
    "cow": ("cattle", "calf", "bull", "ox"),
    "backpack": ("rucksack", "knapsack"),
    "umbrella": ("parasol",),
    "handbag": ("purse",),
    "tie": ("necktie",),
    "suitcase": ("luggage",),
    "frisbee": ("flying disc",),
    "skis": ("ski",),
    "sports ball": ("ball", "football", "soccer ball", "basketball", "tennis ball", "volleyball"),
    "baseball glove": ("baseball mitt", "mitt"),
    "tennis racket": ("racket", "racquet", "tennis racquet"),
    "cup": ("mug", "teacup"),
    "hot dog": ("hotdog", "frankfurter"),
    "donut": ("doughnut",),
    "couch": ("sofa", "settee"),
    "potted plant": ("houseplant", "house plant", "plant pot"),
    "dining table": ("table", "kitchen table"),
    "tv": ("television", "tv set"),
    "laptop": ("laptop computer",),
    "mouse": ("computer mouse",),
    "remote": ("remote control",),
    "cell phone": ("phone", "mobile phone", "cellphone", "smartphone"),
    "microwave": ("microwave oven",),
    "refrigerator": ("fridge",),
    "teddy bear": ("teddy",),
    "hair drier": ("hair dryer", "blow dryer"),
}

_PARENTHETICAL = re.compile(r"\s*\(([^)]*)\)\s*")


def _line(name: str, synonyms: list[str]) -> str:
    if ":" in name or any("," in s or ":" in s for s in synonyms):
        raise ValueError(f"{name!r} / {synonyms}: names cannot hold ':' and synonyms ','")
    return f"{name}: {', '.join(synonyms)}" if synonyms else name


def imagenet_lines() -> list[str]:
    """``imagenet1k.txt`` lines (without the header)."""
    import open_clip
    import torchvision

    names = list(open_clip.IMAGENET_CLASSNAMES)
    torch_names = list(torchvision.models.ResNet50_Weights.DEFAULT.meta["categories"])
    if len(names) != 1000 or len(torch_names) != 1000:
        raise SystemExit(f"expected 1000 ImageNet names, got {len(names)} and {len(torch_names)}")
    own_forms = {normalise(n) for n in names}
    torch_count = Counter(normalise(n) for n in torch_names)
    order: list[str] = []
    synonyms: dict[str, list[str]] = {}
    for name, torch_name in zip(names, torch_names, strict=True):
        if name not in synonyms:
            order.append(name)
            synonyms[name] = []
        extra: list[str] = []
        if "(" in name:
            extra.append(_PARENTHETICAL.sub(" ", name).strip())
        if " / " in name:
            extra.extend(part.strip() for part in name.split(" / "))
        form = normalise(torch_name)
        if (
            " " in form
            and form != normalise(name)
            and form not in own_forms
            and torch_count[form] == 1
        ):
            extra.append(torch_name)
        for term in extra:
            if normalise(term) != normalise(name) and term not in synonyms[name]:
                synonyms[name].append(term)
    return [_line(name, synonyms[name]) for name in order]


def coco_lines() -> list[str]:
    """``coco.txt`` lines (without the header)."""
    import torchvision

    weights = torchvision.models.detection.FasterRCNN_ResNet50_FPN_Weights.DEFAULT
    names = [c for c in weights.meta["categories"] if c not in ("N/A", "__background__")]
    if len(names) != 80:
        raise SystemExit(f"expected 80 COCO categories, got {len(names)}")
    unknown = sorted(set(COCO_SYNONYMS) - set(names))
    if unknown:
        raise SystemExit(f"synonyms for names that are not COCO categories: {unknown}")
    return [_line(name, list(COCO_SYNONYMS.get(name, ()))) for name in names]


HEADERS = {
    "imagenet1k.txt": (
        "ImageNet-1k class names for caption tagging ({count} concepts; ids = line order).\n"
        "Names: open_clip.IMAGENET_CLASSNAMES (open_clip 3.3.0, MIT licence); the duplicate\n"
        "names 'missile' and 'sunglasses' are listed once. Synonyms: parts of names written\n"
        "'a / b' or 'a (note)', and multi-word torchvision ImageNet category names\n"
        "(torchvision 0.22.0, BSD-3-Clause) that differ from the open_clip name.\n"
        "Generated by tools/make_vocabularies.py; do not edit by hand."
    ),
    "coco.txt": (
        "COCO 2017 detection categories for caption tagging ({count} concepts; ids = line order).\n"
        "Names: torchvision FasterRCNN_ResNet50_FPN_Weights meta['categories'] without 'N/A'\n"
        "(torchvision 0.22.0, BSD-3-Clause; COCO annotations CC BY 4.0). Synonyms after ':' are\n"
        "cabs-streaming's own (Apache-2.0). Generated by tools/make_vocabularies.py; do not edit."
    ),
}


def render(filename: str, lines: list[str]) -> str:
    """The file text: a '#' header naming source and licence, then one concept per line."""
    header = HEADERS[filename].format(count=len(lines))
    text = "".join(f"# {h}\n" for h in header.splitlines()) + "".join(f"{x}\n" for x in lines)
    TaggingVocabulary.parse(text, filename)  # must read back
    return text


def main(argv: list[str] | None = None) -> int:
    """Write the vocabulary files; print what was written."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "cabs_streaming" / "vocabularies",
                        help="output directory (default: the package's vocabularies folder)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for filename, lines in (("imagenet1k.txt", imagenet_lines()), ("coco.txt", coco_lines())):
        path = args.out / filename
        path.write_text(render(filename, lines), encoding="utf-8")
        print(f"{path}: {len(lines)} concepts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
