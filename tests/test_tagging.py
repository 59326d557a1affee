"""Concept tagging (cabs_streaming.tagging) and the converter's tagging paths (issue 6).

The caption tagger's rules: word boundaries, case, plural and irregular forms, multi-word names,
leftmost-longest non-overlapping matches, synonyms, punctuation, Unicode, empty captions. The
detector-name mapper: normal forms and unknown names counted, also in convert's report.json.
``--tag-captions`` and ``--tagger`` run through the real converter on tiny WebDataset tars.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import read_back, solid_jpeg, wds, write_tar
from paths import ROOT

from cabs_streaming.cli.convert import main as convert_main
from cabs_streaming.concepts import Vocabulary
from cabs_streaming.converter import ConversionError, convert
from cabs_streaming.tagging import (
    SHIPPED_VOCABULARIES,
    CaptionTagger,
    ConceptNameMapper,
    TaggingVocabulary,
    inflections,
    load_tagger,
    normalise,
    plurals,
    vocabulary_path,
)

VOCABULARY = """\
# a comment, then concepts; ids are line order
dog: puppy, doggy
hot dog: frankfurter
cat
mouse
person: man, woman
bus
leaf
box
puppy love
traffic light
t-shirt
café
"""


@pytest.fixture(scope="module")
def tagger() -> CaptionTagger:
    return CaptionTagger(TaggingVocabulary.parse(VOCABULARY, "test.txt"))


def names(tagger: CaptionTagger, caption: str | None) -> list[str]:
    return tagger.names_in(caption)


# ---------------------------------------------------------------------------------------------
# Caption tagger
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("a dog", ["dog"]),
        ("three dogs", ["dog"]),
        ("two buses and a box of boxes", ["bus", "box", "box"]),
        ("autumn leaves on a leaf", ["leaf", "leaf"]),
        ("mice everywhere, one mouse", ["mouse", "mouse"]),
        ("people, men and women", ["person", "person", "person"]),
        ("Traffic Lights at night", ["traffic light"]),
    ],
)
def test_plural_and_irregular_forms_match(tagger: CaptionTagger, caption: str,
                                          expected: list[str]) -> None:
    assert names(tagger, caption) == expected


def test_multi_word_names_win_over_their_parts(tagger: CaptionTagger) -> None:
    assert names(tagger, "hot dogs and a hot dog for the dog") == ["hot dog", "hot dog", "dog"]
    # One space or one punctuation mark joins a phrase; a comma and a space, or two spaces, do not.
    assert names(tagger, "a hot-dog, a Hot_Dog") == ["hot dog", "hot dog"]
    assert names(tagger, "a hot, dog; hot  dog") == ["dog", "dog"]


def test_names_with_punctuation_match_as_written_and_without_it() -> None:
    tagger = CaptionTagger(TaggingVocabulary.parse("St. Bernard\ncat"))
    assert tagger.names_in("St. Bernards, a st bernard and a St Bernard's bowl") == [
        "St. Bernard"
    ] * 3


def test_overlapping_names_take_the_leftmost_longest(tagger: CaptionTagger) -> None:
    # "puppy love" (2 words) starts where "puppy" (a dog synonym) does: the longer one wins.
    assert names(tagger, "puppy love") == ["puppy love"]
    assert names(tagger, "two puppy loves") == ["puppy love"]  # its plural
    assert names(tagger, "a puppy lover, a puppy") == ["dog", "dog"]  # "love" is not a word here
    # "hot dog" and "dog" + "puppy love" overlap nothing: each mention once, in caption order.
    assert names(tagger, "puppy love for a hot dog puppy") == ["puppy love", "hot dog", "dog"]


def test_word_boundaries_and_punctuation(tagger: CaptionTagger) -> None:
    assert names(tagger, "category catalog cat5 concatenate") == []
    assert names(tagger, "(cat), cat. cat! 'cat' cat's [cats]") == ["cat"] * 6
    assert names(tagger, "dog-friendly hot_dog stand|cat") == ["dog", "hot dog", "cat"]
    assert names(tagger, "T-shirt, tshirt, t shirt, T-SHIRTS") == ["t-shirt"] * 3


def test_case_and_kinds_of_whitespace_do_not_matter(tagger: CaptionTagger) -> None:
    assert names(tagger, "HOT DOG\tand a\nCat\r\nHot\u00a0Dog") == ["hot dog", "cat", "hot dog"]


def test_unicode_captions(tagger: CaptionTagger) -> None:
    assert names(tagger, "Le CAFÉ, deux cafés") == ["café", "café"]
    assert names(tagger, "cafe\u0301 au lait") == ["café"]  # NFKC composes the accent
    assert names(tagger, "\u201cdog\u201d \u2014 🐶dog ✨cat✨") == ["dog", "dog", "cat"]
    assert names(tagger, "dogé catà") == []  # accented letters are word characters
    assert names(tagger, "ｄｏｇ") == ["dog"]  # full-width letters fold (NFKC)
    assert names(tagger, "東京の犬 dog") == ["dog"]


@pytest.mark.parametrize("caption", ["", None, "   ", "...", "🐶"])
def test_empty_captions_give_no_ids(tagger: CaptionTagger, caption: str | None) -> None:
    assert tagger.tag(caption) == []


def test_synonyms_map_to_their_concept_id(tagger: CaptionTagger) -> None:
    vocab = tagger.vocabulary
    assert tagger.tag("a frankfurter, a puppy and a doggy") == [
        vocab.names.index("hot dog"), vocab.names.index("dog"), vocab.names.index("dog")
    ]
    assert names(tagger, "frankfurters and puppies") == ["hot dog", "dog"]


def test_one_id_per_mention_in_caption_order(tagger: CaptionTagger) -> None:
    assert names(tagger, "cat dog cat dog") == ["cat", "dog", "cat", "dog"]
    assert tagger.tag_many(["cat", "", "dog cat"]) == [[2], [], [0, 2]]


def test_without_inflection_only_written_forms_match() -> None:
    plain = CaptionTagger(TaggingVocabulary.parse(VOCABULARY), inflect=False)
    assert plain.names_in("dogs dog mice") == ["dog"]


def test_written_forms_beat_generated_ones_and_conflicts_are_listed() -> None:
    vocab = TaggingVocabulary.parse("glass\nglasses\nperson\npeople: crowd\n")
    tagger = CaptionTagger(vocab)
    assert tagger.names_in("glasses, a glass, people, persons") == [
        "glasses", "glass", "people", "person"
    ]
    assert any(c.form == "glasses" and c.kept == "glasses" for c in tagger.conflicts)
    twice = CaptionTagger(TaggingVocabulary.parse("dog: hound\nhunting dog: hound\n"))
    assert twice.names_in("a hound") == ["dog"]  # listed first wins
    assert [(c.form, c.written) for c in twice.conflicts] == [("hound", True), ("hounds", False)]


# ---------------------------------------------------------------------------------------------
# Normal form and inflection
# ---------------------------------------------------------------------------------------------


def test_normalise_folds_case_punctuation_and_whitespace() -> None:
    assert normalise("  Hot-Dogs,\twith SAUCE!") == "hot dogs with sauce"
    assert normalise("Straße_Café") == "strasse café"
    assert normalise("!!!") == ""


@pytest.mark.parametrize(
    ("word", "forms"),
    [
        ("dog", ["dogs"]),
        ("bus", ["buses", "busses"]),
        ("church", ["churches"]),
        ("puppy", ["puppies"]),
        ("boy", ["boys"]),
        ("leaf", ["leaves", "leafs"]),
        ("knife", ["knives"]),
        ("safe", ["safes"]),  # not "saves": -fe takes -ves only for the nouns that do
        ("tomato", ["tomatos", "tomatoes"]),
        ("child", ["children"]),
        ("foot", ["feet"]),
        ("goose", ["geese"]),
        ("ox", ["oxen"]),
        ("fish", ["fishes"]),
        ("sheep", []),
        ("scissors", []),
        ("snowman", ["snowmen", "snowmans"]),
        ("dormouse", ["dormice", "dormouses"]),
    ],
)
def test_plurals(word: str, forms: list[str]) -> None:
    assert plurals(word) == forms


def test_inflections_of_phrases_and_of_plural_names() -> None:
    assert inflections("hot dog") == ["hot dogs"]
    assert inflections("cup of tea") == ["cup of teas", "cups of tea"]
    assert inflections("people") == ["peoples", "person"]


# ---------------------------------------------------------------------------------------------
# Vocabulary files
# ---------------------------------------------------------------------------------------------


def test_vocabulary_file_lines_synonyms_and_comments() -> None:
    vocab = TaggingVocabulary.parse("\ufeff# c\n\n  Hot   Dog : frank ,  wiener,\ncat\n")
    assert vocab.names == ("Hot Dog", "cat")
    assert vocab.synonyms == (("frank", "wiener"), ())
    assert vocab.vocabulary().names == ["Hot Dog", "cat"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("dog\ncat\ndog\n", r"v.txt:3: concept 'dog' is already listed on line 1"),
        ("dog\n: puppy\n", r"v.txt:2: no concept name"),
        ("dog\n???\n", r"v.txt:2: concept name '\?\?\?' has no letters"),
        ("# only a comment\n", "no concepts"),
    ],
)
def test_vocabulary_file_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TaggingVocabulary.parse(text, "v.txt")


def test_vocabulary_json_and_missing_files(tmp_path: Path) -> None:
    Vocabulary(["dog", "cat"]).save(str(tmp_path))
    vocab = TaggingVocabulary.load(tmp_path / "vocabulary.json")
    assert vocab.names == ("dog", "cat") and vocab.synonyms == ((), ())
    with pytest.raises(FileNotFoundError, match="nope.txt does not exist.*coco"):
        TaggingVocabulary.load(tmp_path / "nope.txt")


def test_shipped_vocabularies_load_with_sources_noted() -> None:
    coco = TaggingVocabulary.load("coco")
    imagenet = TaggingVocabulary.load("imagenet1k")
    assert len(coco) == 80 and len(imagenet) == 998
    for name in SHIPPED_VOCABULARIES:
        header = vocabulary_path(name).read_text(encoding="utf-8").split("\n", 6)[:4]
        assert any(lic in line for line in header for lic in ("MIT", "BSD", "CC BY")), name
    tagger = CaptionTagger(coco)
    assert tagger.names_in("A man on a motorbike with two puppies") == [
        "person", "motorcycle", "dog"
    ]
    assert CaptionTagger(imagenet).names_in("a tabby cat next to goldfishes") == [
        "tabby cat", "goldfish"
    ]


@pytest.mark.slow
def test_the_generator_reproduces_the_shipped_vocabularies(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_vocabularies.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, check=False, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for name in SHIPPED_VOCABULARIES:
        assert (tmp_path / vocabulary_path(name).name).read_bytes() == (
            vocabulary_path(name).read_bytes()
        ), f"{name}: run tools/make_vocabularies.py and commit the result"


# ---------------------------------------------------------------------------------------------
# Detector names onto a fixed vocabulary
# ---------------------------------------------------------------------------------------------


def test_detector_names_map_in_normal_form_and_unknown_names_are_counted() -> None:
    mapper = ConceptNameMapper(["dog", "hot dog", "person", "traffic light"])
    ids = mapper.map(["Dogs", " hot   dog ", "HOT_DOG", "people", "Traffic-Lights", "dog",
                      "unicorn", "Unicorn", "unicorn", ""])
    assert ids == [0, 1, 1, 2, 3, 0]
    assert mapper.unknown == {"unicorn": 2, "Unicorn": 1, "": 1}
    report = mapper.report()
    assert report["unknown"] == {"unicorn": 2, "": 1, "Unicorn": 1}
    assert report["unknown_distinct"] == 3 and report["unknown_instances"] == 4
    assert {"name": "Dogs", "concept": "dog", "count": 1} in report["normalised"]


# ---------------------------------------------------------------------------------------------
# The tagger hook
# ---------------------------------------------------------------------------------------------


def _hook(tmp_path: Path, body: str) -> str:
    path = tmp_path / "my_tagger.py"
    path.write_text(body)
    return f"{path}:tag"


def test_load_tagger_takes_a_module_or_a_file(tmp_path: Path) -> None:
    spec = _hook(tmp_path, "def tag(image, caption):\n    return ['dog']\n")
    assert load_tagger(spec)(b"", "x") == ["dog"]
    assert load_tagger("json:dumps")(["a"]) == '["a"]'


def test_a_tagger_module_is_found_in_the_current_directory_without_editing_sys_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "cwd_tags_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "detector.py").write_text("def tag(image, caption):\n    return ['cat']\n")
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    try:
        assert load_tagger("cwd_tags_pkg.detector:tag")(b"", "x") == ["cat"]
    finally:
        for name in ("cwd_tags_pkg.detector", "cwd_tags_pkg"):
            sys.modules.pop(name, None)
        load_tagger.cache_clear()
    assert sys.path == before


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", r"--tagger 'no_colon': expected MODULE:FUNCTION"),
        ("no_such_module_xyz:tag", r"--tagger 'no_such_module_xyz:tag': cannot import"),
        ("json:no_such_function", r"'json' has no attribute 'no_such_function'"),
        ("json:__doc__", r"json.__doc__ is a str, not a function"),
    ],
)
def test_bad_tagger_specs_are_named(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_tagger(spec)


# ---------------------------------------------------------------------------------------------
# Through the converter
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    return [solid_jpeg((40 * i, 255 - 40 * i, 90)) for i in range(6)]


def _caption_tar(tmp_path: Path, jpegs: list[bytes]) -> Path:
    captions = ["Two hot dogs and a puppy", "A cat on a sofa", "nothing to see", "mice!", ""]
    return write_tar(tmp_path / "c.tar", [
        wds(f"s{i}", jpegs[i], {"caption": c}) for i, c in enumerate(captions)
    ])


def test_tag_captions_takes_ids_from_the_caption(tmp_path: Path, jpegs: list[bytes]) -> None:
    vocab_file = tmp_path / "v.txt"
    vocab_file.write_text("dog: puppy\nhot dog\ncat\nmouse\nsofa: couch\n")
    report = convert([str(_caption_tar(tmp_path, jpegs))], "webdataset", str(tmp_path / "out"),
                     tag_captions=str(vocab_file), progress=False)

    assert report["written"] == 4 and report["skipped"]["missing caption"] == 1
    assert report["vocabulary"] == {"source": "tag-captions", "size": 5, "added": 0}
    assert report["concept_source"] == {"tag-captions": str(vocab_file)}
    assert Vocabulary.load(str(tmp_path / "out")).names == ["dog", "hot dog", "cat", "mouse",
                                                           "sofa"]
    rows = read_back(tmp_path / "out")
    assert [r["concepts"] for r in rows] == [["hot dog", "dog"], ["cat", "sofa"], [], ["mouse"]]
    assert report["concepts"]["instances"] == 5
    assert report["concepts"]["samples_without_concepts"] == 1


def test_tag_captions_needs_no_concept_field_in_jsonl_or_parquet(
    tmp_path: Path, jpegs: list[bytes]
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jpg").write_bytes(jpegs[0])
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "a.jpg", "caption": "Two Dogs"}) + "\n")
    report = convert([str(tmp_path / "m.jsonl")], "jsonl", str(tmp_path / "j"),
                     tag_captions="coco", progress=False)
    assert report["written"] == 1
    assert [r["concepts"] for r in read_back(tmp_path / "j")] == [["dog"]]

    table = pa.table({"image": [jpegs[1]], "caption": ["a cat on a couch"]})
    pq.write_table(table, tmp_path / "p.parquet")
    report = convert([str(tmp_path / "p.parquet")], "parquet", str(tmp_path / "q"),
                     tag_captions="coco", progress=False)
    assert report["written"] == 1
    assert [r["concepts"] for r in read_back(tmp_path / "q")] == [["cat", "couch"]]


def test_tag_captions_excludes_the_other_concept_sources(tmp_path: Path,
                                                         jpegs: list[bytes]) -> None:
    tar = _caption_tar(tmp_path, jpegs)
    for kwargs, message in [
        ({"concepts_from": "tags"}, "--tag-captions and --concepts-from are mutually exclusive"),
        ({"tagger": "json:dumps"}, "--tag-captions and --tagger are mutually exclusive"),
        ({"vocabulary": str(tmp_path / "x.json")}, "leave out --vocabulary"),
    ]:
        with pytest.raises(ConversionError, match=message):
            convert([str(tar)], "webdataset", str(tmp_path / "out"), tag_captions="coco",
                    progress=False, **kwargs)
    with pytest.raises(ConversionError, match="--tag-captions: vocabulary file nope.txt"):
        convert([str(tar)], "webdataset", str(tmp_path / "out"), tag_captions="nope.txt",
                progress=False)
    assert not (tmp_path / "out").exists()


TAGGER = """\
import io
from PIL import Image

def tag(image, caption):
    with open(__file__ + ".calls", "a") as log:
        log.write(caption + "\\n")
    red = Image.open(io.BytesIO(image)).convert("RGB").getpixel((8, 8))[0]
    names = ["Red Things"] * (red > 100) + ["Dogs"] * ("dog" in caption)
    return names + ["ufo"] * ("ufo" in caption)
"""


def test_tagger_hook_names_are_mapped_and_unknown_ones_counted(
    tmp_path: Path, jpegs: list[bytes]
) -> None:
    spec = _hook(tmp_path, TAGGER)
    tar = write_tar(tmp_path / "t.tar", [
        wds("a", jpegs[0], {"caption": "a dog"}),        # red 0
        wds("b", jpegs[4], {"caption": "dog and red"}),  # red 160
        wds("c", jpegs[1], {"caption": "a ufo"}),
        wds("d", jpegs[5], {"caption": "plain red"}),
        wds("e", b"not an image", {"caption": "a dog"}),
    ])
    vocab = tmp_path / "vocab.json"
    vocab.write_text(Vocabulary(["dog", "red thing"]).to_json())
    report = convert([str(tar)], "webdataset", str(tmp_path / "out"), tagger=spec,
                     vocabulary=str(vocab), progress=False)

    assert report["concept_source"] == {"tagger": spec}
    assert report["written"] == 3
    assert report["skipped"]["unknown concept"] == 1
    assert report["skipped"]["undecodable image"] == 1
    assert report["concept_names"]["unknown"] == {"ufo": 1}
    assert {(n["name"], n["concept"]) for n in report["concept_names"]["normalised"]} == {
        ("Dogs", "dog"), ("Red Things", "red thing")
    }
    rows = read_back(tmp_path / "out")
    assert [(r["key"], r["concepts"]) for r in rows] == [
        ("a", ["dog"]), ("b", ["red thing", "dog"]), ("d", ["red thing"])
    ]
    # Called once per sample with a usable image, never for the undecodable one.
    calls = Path(spec.rpartition(":")[0] + ".calls").read_text().splitlines()
    assert calls == ["a dog", "dog and red", "a ufo", "plain red"]


def test_tagger_hook_builds_a_vocabulary_and_runs_in_workers(
    tmp_path: Path, jpegs: list[bytes]
) -> None:
    spec = _hook(tmp_path, "def tag(image, caption):\n    return caption.split()\n")
    tars = [
        write_tar(tmp_path / f"{t}.tar", [
            wds(f"{t}{i}", jpegs[i], {"caption": f"cat dog{' dog' * i}"}) for i in range(2)
        ])
        for t in "xy"
    ]
    report = convert([str(t) for t in tars], "webdataset", str(tmp_path / "out"), tagger=spec,
                     workers=2, progress=False)
    assert report["written"] == 4 and report["vocabulary"]["source"] == "built"
    assert Vocabulary.load(str(tmp_path / "out")).names == ["dog", "cat"]
    assert [r["concepts"] for r in read_back(tmp_path / "out")] == [
        ["cat", "dog"], ["cat", "dog", "dog"]
    ] * 2


def test_tagger_errors_name_the_spec_and_the_sample(tmp_path: Path, jpegs: list[bytes]) -> None:
    tar = write_tar(tmp_path / "e.tar", [wds("k1", jpegs[0], {"caption": "x"})])
    with pytest.raises(ConversionError, match="--tagger 'nope:tag': cannot import"):
        convert([str(tar)], "webdataset", str(tmp_path / "o1"), tagger="nope:tag",
                progress=False)
    raising = _hook(tmp_path, "def tag(image, caption):\n    raise RuntimeError('gpu on fire')\n")
    with pytest.raises(ConversionError, match="failed on sample 'k1'.*gpu on fire"):
        convert([str(tar)], "webdataset", str(tmp_path / "o2"), tagger=raising, progress=False)
    (tmp_path / "my_tagger.py").unlink()
    bad = _hook(tmp_path, "def tag(image, caption):\n    return 'dog'\n")
    load_tagger.cache_clear()
    with pytest.raises(ConversionError, match="returned \"dog\" for sample 'k1'.*list of"):
        convert([str(tar)], "webdataset", str(tmp_path / "o3"), tagger=bad, progress=False)


def test_detector_names_normalise_onto_a_fixed_vocabulary_with_unknowns_in_the_report(
    tmp_path: Path, jpegs: list[bytes]
) -> None:
    tar = write_tar(tmp_path / "d.tar", [
        wds("a", jpegs[0], {"caption": "x", "classes": ["Dogs", "hot_dog"]}),
        wds("b", jpegs[1], {"caption": "y", "classes": ["dog", "Unicorn", "ufo", "ufo"]}),
        wds("c", jpegs[2], {"caption": "z", "classes": ["People"]}),
        wds("d", jpegs[3], {"caption": "w", "classes": ["ufo"]}),
    ])
    vocab = tmp_path / "vocab.json"
    vocab.write_text(Vocabulary(["dog", "hot dog", "person"]).to_json())
    report = convert([str(tar)], "webdataset", str(tmp_path / "out"), vocabulary=str(vocab),
                     progress=False)

    assert report["skipped"]["unknown concept"] == 2
    assert "'Unicorn' is not in the vocabulary (and 2 more unknown names)" in (
        report["examples"]["unknown concept"][0]["detail"]
    )
    assert report["concept_names"]["unknown"] == {"ufo": 3, "Unicorn": 1}
    assert report["concept_names"]["unknown_distinct"] == 2
    assert report["concept_names"]["normalised"] == [
        {"name": "Dogs", "concept": "dog", "count": 1},
        {"name": "People", "concept": "person", "count": 1},
        {"name": "hot_dog", "concept": "hot dog", "count": 1},
    ]
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report
    assert [r["concepts"] for r in read_back(tmp_path / "out")] == [["dog", "hot dog"],
                                                                    ["person"]]


def test_extend_vocabulary_does_not_add_names_it_already_has_in_normal_form(
    tmp_path: Path, jpegs: list[bytes]
) -> None:
    tar = write_tar(tmp_path / "x.tar", [
        wds("a", jpegs[0], {"caption": "x", "classes": ["Dogs", "zebra"]}),
        wds("b", jpegs[1], {"caption": "y", "classes": ["dog", "Zebras", "zebra"]}),
    ])
    vocab = tmp_path / "vocab.json"
    vocab.write_text(Vocabulary(["cat", "dog"]).to_json())
    report = convert([str(tar)], "webdataset", str(tmp_path / "out"), vocabulary=str(vocab),
                     extend_vocabulary=True, progress=False)
    assert Vocabulary.load(str(tmp_path / "out")).names == ["cat", "dog", "zebra", "Zebras"]
    assert report["vocabulary"] == {"source": "given", "size": 4, "added": 2}
    assert [r["concepts"] for r in read_back(tmp_path / "out")] == [
        ["dog", "zebra"], ["dog", "Zebras", "zebra"]
    ]


def test_cli_tag_captions_and_tagger_flags(
    tmp_path: Path, jpegs: list[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    tar = _caption_tar(tmp_path, jpegs)
    common = ["--input", str(tar), "--format", "webdataset", "--no-progress"]
    status = convert_main([*common, "--out", str(tmp_path / "out"), "--tag-captions", "coco"])
    assert status == 0
    assert json.loads(capsys.readouterr().out)["concept_source"] == {"tag-captions": "coco"}
    status = convert_main([*common, "--out", str(tmp_path / "bad"), "--tagger", "not-a-spec"])
    assert status == 2 and "--tagger 'not-a-spec'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------


def test_tag_concepts_cli_tags_captions_files_and_names(tmp_path: Path) -> None:
    script = str(ROOT / "tools" / "tag_concepts.py")
    (tmp_path / "in.jsonl").write_text(
        json.dumps({"id": 1, "text": "Two hot dogs"}) + "\n" + json.dumps({"id": 2, "text": ""})
        + "\n"
    )
    result = subprocess.run(
        [sys.executable, script, "--vocabulary", "coco", "a cat", "--input",
         str(tmp_path / "in.jsonl"), "--field", "text", "--write-vocabulary", str(tmp_path),
         "--no-progress"],
        capture_output=True, text=True, check=False, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(x) for x in result.stdout.splitlines()]
    assert lines[0] == {"caption": "a cat", "concepts": [15], "concept_names": ["cat"]}
    assert lines[1]["id"] == 1 and lines[1]["concept_names"] == ["hot dog"]
    assert lines[2]["concepts"] == []
    assert len(Vocabulary.load(str(tmp_path)).names) == 80

    names = subprocess.run(
        [sys.executable, script, "--vocabulary", "coco", "--names", "Dogs", "ufo"],
        capture_output=True, text=True, check=False, timeout=120,
    )
    mapped = json.loads(names.stdout)
    assert mapped["concept_names"] == ["dog"] and mapped["unknown"] == {"ufo": 1}


def test_bench_tagging_prints_one_json_line() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_tagging.py"), "--concepts", "3000",
         "--captions", "3000", "--repeats", "1"],
        capture_output=True, text=True, check=False, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    stats = json.loads(lines[0])
    assert stats["concepts"] == 3000 and stats["captions"] == 3000
    assert stats["captions_per_s"] > 0
    # Every planted mention is found (filler words are not concept names).
    assert stats["ids_per_caption"] >= stats["planted_mentions_per_caption"]


# ---------------------------------------------------------------------------------------------
# Empty vocabularies
# ---------------------------------------------------------------------------------------------


def test_a_tagger_without_concepts_finds_nothing_instead_of_crashing() -> None:
    tagger = CaptionTagger(TaggingVocabulary.from_names([]))
    assert tagger.tag("a dog on a sofa") == []
    assert tagger.tag_many(["a cat", "", None]) == [[], [], []]


def test_an_empty_vocabulary_json_is_refused_with_its_name(tmp_path: Path) -> None:
    Vocabulary([]).save(str(tmp_path))
    with pytest.raises(ValueError, match=r"vocabulary.json: no concepts"):
        TaggingVocabulary.load(tmp_path / "vocabulary.json")
    with pytest.raises(ConversionError, match=r"--tag-captions: .*vocabulary.json: no concepts"):
        convert([str(tmp_path / "none.jsonl")], "jsonl", str(tmp_path / "out"),
                tag_captions=tmp_path / "vocabulary.json", progress=False)
