"""Concept ids for data that has none: a caption tagger, a detector-name mapper, a tagger hook.

CABS needs concept ids on every sample. DataConcept-style data brings detector outputs (names per
box); most image-text data brings only a caption. This module gives both a path, and
``cabs-convert`` (``--tag-captions``, ``--tagger``) and ``cabs-tag`` are thin commands over it.

Vocabulary files
----------------
A tagging vocabulary is a UTF-8 text file with one concept per line, ids in file order::

    # comment lines and blank lines are ignored
    dog
    hot dog: frankfurter, hotdog
    person: man, woman, child

The text before ``:`` is the concept name (as written into ``vocabulary.json``); the
comma-separated terms after it are synonyms that map to the same id. A name cannot contain ``:``
and a synonym cannot contain ``,``. A ``vocabulary.json`` is accepted as well (names only), and the
files shipped in ``cabs_streaming/vocabularies`` are found by their short names (``coco``,
``imagenet1k``; see :data:`SHIPPED_VOCABULARIES`).

Matching rules (what the caller can rely on)
--------------------------------------------
- **Normal form.** Names, synonyms, captions and detector names are compared after NFKC and
  case folding, with every character that is not a letter, digit or combining mark (spaces,
  punctuation, ``_``, emoji) turned into a space (:func:`normalise` also collapses runs of
  spaces, for names). So "T-Shirt", "t shirt" and "t_shirt" are the same term, and "dog's"
  holds the word "dog".
- **Phrases.** Captions are not collapsed (that makes tagging about 1.4x slower): the words of a
  multi-word name must be separated as in one of its written forms, by one space or one
  punctuation mark ("hot dog", "Hot-Dog", "hot_dog"), or by what the name itself writes ("St.
  Bernard" matches "St. Bernard" and "St Bernard"). "hot, dog" and "hot  dog" are no hot dog.
- **Word boundaries.** A term matches only whole words: "cat" is not found in "category" or
  "cat5", but is in "cat." and "(cat)". Letters of every script are word characters, so scripts
  written without spaces (Chinese, Japanese, Thai) only match whole space-separated runs; tag
  such captions with your own function through ``--tagger``.
- **Inflection.** Every name and synonym also matches its English plural forms (the last word is
  inflected, and the word before the first "of": "cups of tea"): regular ``-s``; ``-es`` after
  s, x, z, ch, sh and o; ``-y`` -> ``-ies`` after a consonant; ``-f``/``-fe`` -> ``-ves`` for the
  nouns that take it (leaf, knife, wolf, ...); ``-man`` -> ``-men``; an irregular table (mouse/mice,
  person/people, child/children, foot/feet, goose/geese, ox/oxen, cactus/cacti, ...), which also
  maps those plurals back to their singular; and nouns whose plural is unchanged (fish, sheep,
  deer, ...). Generated forms are only ever extra keys, so an odd one ("germen") costs nothing.
- **Leftmost-longest, non-overlapping.** Among matches, the one starting first wins, and among
  those the longest: "hot dogs" is one "hot dog", not a "dog". One id is emitted per mention, in
  caption order; an empty caption gives no ids.
- **Conflicts.** When two concepts claim the same normal form, a written name or synonym beats a
  generated inflection, and otherwise the concept listed first wins; the losers are listed in
  :attr:`CaptionTagger.conflicts`.

Speed comes from one Aho-Corasick automaton (pyahocorasick) over all forms, each stored with a
space on both sides, run over the folded caption with a space on both sides: a key can then only
match at word boundaries, so every match the automaton reports is a real mention, and the
leftmost-longest choice is a sort of a few tuples. ``tools/bench_tagging.py`` measures it.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import json
import os
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import ahocorasick

from cabs_streaming.concepts import Vocabulary

__all__ = [
    "SHIPPED_VOCABULARIES",
    "CaptionTagger",
    "ConceptNameMapper",
    "TaggingVocabulary",
    "inflections",
    "load_tagger",
    "normalise",
    "plurals",
    "vocabulary_path",
]

#: The vocabularies shipped as package data, by short name (sources and licences:
#: ``cabs_streaming/vocabularies/README.md``).
SHIPPED_VOCABULARIES: dict[str, str] = {
    "coco": "coco.txt",
    "imagenet1k": "imagenet1k.txt",
}
_VOCABULARY_DIR = Path(__file__).resolve().parent / "vocabularies"

# ---------------------------------------------------------------------------------------------
# Normal form
# ---------------------------------------------------------------------------------------------

#: ASCII fast path: lower-case letters and digits, everything else a space (a 1:1 table, which
#: CPython's ``str.translate`` runs as a plain byte loop).
_ASCII_TABLE = str.maketrans(
    {i: (chr(i).lower() if chr(i).isalnum() else " ") for i in range(128)}
)


class _UnicodeFoldTable(dict[int, str]):
    """``str.translate`` table for non-ASCII text, filled per character on first sight.

    Letters, digits and combining marks map to themselves, everything else to a space; ASCII is
    the fast table's. ``dict.__missing__`` keeps the lookup in C for every character seen before,
    which makes this about four times faster than a regular expression over the same classes.
    """

    def __missing__(self, code: int) -> str:
        char = chr(code)
        value = char if char.isalnum() or unicodedata.category(char)[0] == "M" else " "
        self[code] = value
        return value


_UNICODE_TABLE = _UnicodeFoldTable(
    {i: (chr(i).lower() if chr(i).isalnum() else " ") for i in range(128)}
)


def _fold(text: str) -> str:
    """Case-fold ``text`` and turn each non-word character into a space (runs not collapsed)."""
    if text.isascii():
        return text.translate(_ASCII_TABLE)
    return unicodedata.normalize("NFKC", text).casefold().translate(_UNICODE_TABLE)


def normalise(text: str) -> str:
    """The normal form every comparison uses: folded, one space between words, no outer spaces.

    >>> normalise("  Hot-Dogs, with SAUCE!")
    'hot dogs with sauce'
    """
    return " ".join(_fold(text).split())


# ---------------------------------------------------------------------------------------------
# Inflection
# ---------------------------------------------------------------------------------------------

#: Irregular plurals, also applied as a suffix ("dormouse" -> "dormice", "snowman" -> "snowmen",
#: with the regular form added there, as the suffix may be a coincidence).
_IRREGULAR: dict[str, tuple[str, ...]] = {
    "man": ("men",),
    "woman": ("women",),
    "child": ("children",),
    "person": ("people", "persons"),
    "mouse": ("mice", "mouses"),
    "louse": ("lice",),
    "foot": ("feet",),
    "tooth": ("teeth",),
    "goose": ("geese",),
    "ox": ("oxen",),
    "fish": ("fishes",),
    "cactus": ("cacti", "cactuses"),
    "fungus": ("fungi", "funguses"),
    "octopus": ("octopuses", "octopi"),
    "hippopotamus": ("hippopotamuses", "hippopotami"),
    "platypus": ("platypuses",),
    "bus": ("buses", "busses"),
    "quiz": ("quizzes",),
    "leaf": ("leaves", "leafs"),
    "loaf": ("loaves",),
    "thief": ("thieves",),
    "calf": ("calves",),
    "half": ("halves",),
    "wolf": ("wolves",),
    "shelf": ("shelves",),
    "elf": ("elves",),
    "sheaf": ("sheaves",),
    "scarf": ("scarves", "scarfs"),
    "hoof": ("hooves", "hoofs"),
    "dwarf": ("dwarfs", "dwarves"),
    "wharf": ("wharves", "wharfs"),
    "knife": ("knives",),
    "wife": ("wives",),
    "life": ("lives",),
    "crisis": ("crises",),
    "thesis": ("theses",),
    "analysis": ("analyses",),
    "oasis": ("oases",),
    "axis": ("axes",),
    "index": ("indices", "indexes"),
    "matrix": ("matrices",),
    "vertex": ("vertices",),
    "appendix": ("appendices", "appendixes"),
    "bacterium": ("bacteria",),
    "criterion": ("criteria",),
    "phenomenon": ("phenomena",),
    "larva": ("larvae",),
    "antenna": ("antennas", "antennae"),
    "alga": ("algae",),
    "vertebra": ("vertebrae",),
    "genus": ("genera",),
    "penny": ("pennies", "pence"),
    "passerby": ("passersby",),
}
#: Singular of each irregular plural (a name written in the plural also matches its singular).
_SINGULAR: dict[str, str] = {
    plural: singular for singular, forms in _IRREGULAR.items() for plural in forms
}
#: Nouns whose plural is the word itself, and nouns used only in the plural.
_UNCHANGED = frozenset(
    """
    sheep deer moose bison salmon trout swine aircraft spacecraft hovercraft watercraft series
    species squid cod offspring reindeer tuna pike halibut carp bream mackerel haddock sturgeon
    means news equipment furniture luggage baggage clothing scissors trousers pants jeans shorts
    pajamas pyjamas glasses sunglasses goggles binoculars tongs pliers tights leggings clothes
    headphones earphones
    """.split()
)
_VOWELS = frozenset("aeiou")
_SIBILANT_ENDINGS = ("s", "x", "z", "ch", "sh")


def plurals(word: str) -> list[str]:
    """English plural forms of one normalised word (possibly several; never the word itself)."""
    if len(word) < 2 or not word[-1].isalpha() or word in _UNCHANGED:
        return []
    if word in _IRREGULAR:
        return list(_IRREGULAR[word])
    forms: list[str] = []
    for singular, irregular in _IRREGULAR.items():
        if len(singular) >= 3 and word.endswith(singular):
            stem = word[: -len(singular)]
            forms.extend(stem + plural for plural in irregular)
            break
    if word.endswith("y") and word[-2] not in _VOWELS:
        forms.append(word[:-1] + "ies")
    elif word.endswith(_SIBILANT_ENDINGS):
        forms.append(word + "es")
    elif word.endswith("o"):
        forms.extend((word + "s", word + "es"))
    else:
        forms.append(word + "s")
    return [form for form in dict.fromkeys(forms) if form != word]


def inflections(term: str) -> list[str]:
    """Other forms of a normalised term: plurals of its last word (and of the word before "of")."""
    words = term.split(" ")
    if not words or not words[0]:
        return []
    slots = [len(words) - 1]
    if "of" in words[1:-1]:
        slots.append(words.index("of", 1) - 1)
    forms: list[str] = []
    for slot in slots:
        word = words[slot]
        variants = plurals(word)
        if word in _SINGULAR:
            variants.append(_SINGULAR[word])
        for variant in variants:
            forms.append(" ".join([*words[:slot], variant, *words[slot + 1 :]]))
    return [form for form in dict.fromkeys(forms) if form != term]


# ---------------------------------------------------------------------------------------------
# Vocabulary files
# ---------------------------------------------------------------------------------------------


def vocabulary_path(name: str) -> Path:
    """Path of a shipped vocabulary by short name; ``KeyError`` listing the names otherwise."""
    try:
        return _VOCABULARY_DIR / SHIPPED_VOCABULARIES[name]
    except KeyError:
        raise KeyError(
            f"{name!r} is not a shipped vocabulary; choose one of "
            f"{', '.join(sorted(SHIPPED_VOCABULARIES))} or give a file path"
        ) from None


@dataclass(frozen=True)
class TaggingVocabulary:
    """Concept names (ids = positions) with their synonyms, as read from a vocabulary file."""

    names: tuple[str, ...]
    synonyms: tuple[tuple[str, ...], ...]
    source: str = "<memory>"

    def __post_init__(self) -> None:
        if len(self.synonyms) != len(self.names):
            raise ValueError(
                f"{self.source}: {len(self.names)} names but {len(self.synonyms)} synonym lists"
            )
        Vocabulary(list(self.names))  # the same name rules as vocabulary.json

    def __len__(self) -> int:
        return len(self.names)

    @classmethod
    def from_names(cls, names: Iterable[str], source: str = "<memory>") -> TaggingVocabulary:
        """A vocabulary without synonyms."""
        names = tuple(names)
        return cls(names, tuple(() for _ in names), source)

    @classmethod
    def parse(cls, text: str, source: str = "<text>") -> TaggingVocabulary:
        """Parse vocabulary-file text; errors name ``source`` and the line."""
        names: list[str] = []
        synonyms: list[tuple[str, ...]] = []
        seen: dict[str, int] = {}
        for number, line in enumerate(text.lstrip("\ufeff").splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, colon, rest = line.partition(":")
            name = " ".join(name.split())
            if not name:
                raise ValueError(f"{source}:{number}: no concept name before ':' in {line!r}")
            if not normalise(name):
                raise ValueError(
                    f"{source}:{number}: concept name {name!r} has no letters or digits, so "
                    "it can never match; remove it or spell it out"
                )
            if name in seen:
                raise ValueError(
                    f"{source}:{number}: concept {name!r} is already listed on line "
                    f"{seen[name]}; list each concept once and put other spellings after ':'"
                )
            seen[name] = number
            terms = tuple(" ".join(s.split()) for s in rest.split(",")) if colon else ()
            for term in terms:
                if term and not normalise(term):
                    raise ValueError(
                        f"{source}:{number}: synonym {term!r} of {name!r} has no letters or digits"
                    )
            names.append(name)
            synonyms.append(tuple(t for t in terms if t))
        if not names:
            raise ValueError(f"{source}: no concepts (one name per line, '#' starts a comment)")
        return cls(tuple(names), tuple(synonyms), source)

    @classmethod
    def load(cls, path_or_name: str | os.PathLike[str]) -> TaggingVocabulary:
        """Read a vocabulary file, a ``vocabulary.json``, or a shipped vocabulary by name."""
        text_path = os.fspath(path_or_name)
        if text_path in SHIPPED_VOCABULARIES and not os.path.exists(text_path):
            path = vocabulary_path(text_path)
        else:
            path = Path(text_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"vocabulary file {text_path} does not exist; give a text file (one concept per "
                f"line), a vocabulary.json, or a shipped name ({', '.join(SHIPPED_VOCABULARIES)})"
            )
        if path.suffix == ".json":
            names = Vocabulary.load(str(path)).names
            if not names:  # a tagger with nothing to find would tag every caption with nothing
                raise ValueError(
                    f"{path}: no concepts (its \"concepts\" list is empty); give a vocabulary "
                    "with at least one name"
                )
            return cls.from_names(names, str(path))
        return cls.parse(path.read_text(encoding="utf-8"), str(path))

    def vocabulary(self) -> Vocabulary:
        """The ``vocabulary.json`` these ids mean."""
        return Vocabulary(list(self.names))


# ---------------------------------------------------------------------------------------------
# Surface forms shared by the caption tagger and the name mapper
# ---------------------------------------------------------------------------------------------

_WRITTEN, _GENERATED = 0, 1


@dataclass(frozen=True)
class Conflict:
    """A normal form claimed by two concepts; ``kept`` won it (see the module docs)."""

    form: str
    kept: str
    lost: str
    written: bool  # True when both wrote the form themselves (a likely mistake in the file)


def _respace(form: str, separators: Sequence[str]) -> str:
    """``form``'s words joined by ``separators`` (the space runs of a written term)."""
    words = form.split(" ")
    return "".join(w + s for w, s in zip(words, [*separators, ""], strict=True))


def _surface_forms(
    names: Sequence[str],
    synonyms: Sequence[Sequence[str]],
    inflect: bool,
    as_written: bool = False,
) -> tuple[dict[str, int], list[Conflict]]:
    """Normal form -> concept id for every name, synonym and (if asked) their inflections.

    ``as_written`` adds, for a term whose punctuation leaves more than one space between words
    ("St. Bernard" -> "st  bernard"), that spacing too: captions are folded but not collapsed.
    """
    best: dict[str, tuple[int, int]] = {}
    conflicts: list[Conflict] = []
    for cid, (name, others) in enumerate(zip(names, synonyms, strict=True)):
        for term in (name, *others):
            form = normalise(term)
            if not form:
                continue
            generated = inflections(form) if inflect else []
            candidates = [(form, _WRITTEN), *((f, _GENERATED) for f in generated)]
            spaced = _fold(term).strip()
            if as_written and spaced != form:
                separators = re.findall(" +", spaced)
                candidates.append((spaced, _WRITTEN))
                candidates.extend((_respace(f, separators), _GENERATED) for f in generated)
            for candidate, rank in candidates:
                held = best.get(candidate)
                if held is None or (rank, cid) < held:
                    if held is not None and held[1] != cid:
                        conflicts.append(Conflict(
                            candidate, names[cid], names[held[1]], rank == held[0] == _WRITTEN
                        ))
                    best[candidate] = (rank, cid)
                elif held[1] != cid:
                    conflicts.append(Conflict(
                        candidate, names[held[1]], names[cid], rank == held[0] == _WRITTEN
                    ))
    return {form: cid for form, (_, cid) in best.items()}, conflicts


# ---------------------------------------------------------------------------------------------
# The caption tagger
# ---------------------------------------------------------------------------------------------


class CaptionTagger:
    """Concept ids mentioned in captions: one id per mention, in caption order.

    Build once per process (about a second for 20,000 concepts) and call :meth:`tag` per caption;
    see the module docstring for the matching rules. Deterministic and thread-safe for reading.

    >>> tagger = CaptionTagger(TaggingVocabulary.from_names(["dog", "hot dog", "mouse"]))
    >>> tagger.tag("Two hot dogs, a DOG and three mice.")
    [1, 0, 2]
    """

    def __init__(self, vocabulary: TaggingVocabulary, *, inflect: bool = True) -> None:
        self.vocabulary = vocabulary
        forms, self.conflicts = _surface_forms(
            vocabulary.names, vocabulary.synonyms, inflect, as_written=True
        )
        automaton = ahocorasick.Automaton()
        for form, cid in forms.items():
            key = f" {form} "
            # Value: (concept id, length - 1); start = end - (length - 1).
            automaton.add_word(key, (cid, len(key) - 1))
        # pyahocorasick refuses to search an automaton without keys (AttributeError); with no
        # concepts there is nothing to find, so searching yields nothing instead.
        self._find: Callable[[str], Iterable[tuple[int, tuple[int, int]]]] = _find_nothing
        if forms:
            automaton.make_automaton()
            self._find = automaton.iter
        self.num_forms = len(forms)

    @classmethod
    def load(cls, path_or_name: str | os.PathLike[str], *, inflect: bool = True) -> CaptionTagger:
        """Build from a vocabulary file, a ``vocabulary.json`` or a shipped name."""
        return cls(TaggingVocabulary.load(path_or_name), inflect=inflect)

    @property
    def names(self) -> tuple[str, ...]:
        """Concept names; an id is a position here."""
        return self.vocabulary.names

    def tag(self, caption: str | None) -> list[int]:
        """Concept ids mentioned in ``caption`` (leftmost-longest, one per mention, in order)."""
        return self.tag_many((caption,))[0]

    def tag_many(self, captions: Iterable[str | None]) -> list[list[int]]:
        """:meth:`tag` for each caption; the loop is inlined, as this is the hot path."""
        find = self._find
        ascii_table = _ASCII_TABLE
        fold = _fold
        results: list[list[int]] = []
        append = results.append
        for caption in captions:
            if not caption:
                append([])
                continue
            folded = caption.translate(ascii_table) if caption.isascii() else fold(caption)
            matches = [(end - extra, -extra, cid) for end, (cid, extra) in find(f" {folded} ")]
            if len(matches) < 2:
                append([m[2] for m in matches])
                continue
            matches.sort()
            ids = []
            free = 0  # first index the next match may start at (neighbours share one space)
            for start, neg_extra, cid in matches:
                if start >= free:
                    ids.append(cid)
                    free = start - neg_extra
            append(ids)
        return results

    def names_in(self, caption: str | None) -> list[str]:
        """The concept names :meth:`tag` finds, for reading and logging."""
        names = self.vocabulary.names
        return [names[i] for i in self.tag(caption)]


def _find_nothing(text: str) -> Iterable[tuple[int, tuple[int, int]]]:
    """The search of a tagger without concepts."""
    del text
    return ()


@lru_cache(maxsize=4)
def cached_caption_tagger(path_or_name: str) -> CaptionTagger:
    """One tagger per vocabulary file per process (converter workers build their own)."""
    return CaptionTagger.load(path_or_name)


# ---------------------------------------------------------------------------------------------
# Detector names onto a fixed vocabulary
# ---------------------------------------------------------------------------------------------


class ConceptNameMapper:
    """Map names from detectors or taggers (``classes``, ``tags``) onto a fixed vocabulary.

    A name is looked up as written, then in normal form (case, whitespace, punctuation) among the
    vocabulary's names, synonyms and their plural forms, so "Dogs", " hot  dog" and "Hot_Dog"
    find "dog" and "hot dog". Names that match nothing are counted in :attr:`unknown`, names that
    matched only after normalising in :attr:`normalised` (``(name, concept) -> count``).

    >>> mapper = ConceptNameMapper(["dog", "hot dog", "person"])
    >>> mapper.map(["Dogs", "people", "HOT_DOG", "unicorn", "unicorn"])
    [0, 2, 1]
    >>> dict(mapper.unknown)
    {'unicorn': 2}
    """

    def __init__(
        self,
        names: Sequence[str] | Vocabulary | TaggingVocabulary,
        synonyms: Sequence[Sequence[str]] | None = None,
    ) -> None:
        if isinstance(names, TaggingVocabulary):
            synonyms = names.synonyms if synonyms is None else synonyms
            names = names.names
        elif isinstance(names, Vocabulary):
            names = names.names
        self.names: tuple[str, ...] = tuple(names)
        self._exact = {name: i for i, name in enumerate(self.names)}
        synonyms = synonyms if synonyms is not None else [()] * len(self.names)
        self._forms, self.conflicts = _surface_forms(self.names, synonyms, inflect=True)
        self.unknown: Counter[str] = Counter()
        self.normalised: Counter[tuple[str, str]] = Counter()

    def lookup(self, name: str) -> int | None:
        """Concept id of ``name`` or ``None``; counts nothing."""
        found = self._exact.get(name)
        if found is None:
            found = self._forms.get(normalise(name))
        return found

    def map(self, names: Iterable[str]) -> list[int]:
        """Ids of the names found, in order; unknown names are counted and left out."""
        ids = []
        for name in names:
            found = self._exact.get(name)
            if found is None:
                found = self._forms.get(normalise(name))
                if found is None:
                    self.unknown[name] += 1
                    continue
                self.normalised[(name, self.names[found])] += 1
            ids.append(found)
        return ids

    def report(self, limit: int = 1000) -> dict[str, object]:
        """Unknown and normalised names with counts, most frequent first (ties by name)."""
        return names_report(self.unknown, self.normalised, limit)


def names_report(
    unknown: Counter[str], normalised: Counter[tuple[str, str]], limit: int = 1000
) -> dict[str, object]:
    """The ``concept_names`` block of ``report.json``: at most ``limit`` entries per list."""
    top_unknown = sorted(unknown.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
    top_normalised = sorted(normalised.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
    return {
        "unknown": dict(top_unknown),
        "unknown_distinct": len(unknown),
        "unknown_instances": sum(unknown.values()),
        "normalised": [
            {"name": name, "concept": concept, "count": count}
            for (name, concept), count in top_normalised
        ],
    }


@lru_cache(maxsize=4)
def cached_name_mapper(names: tuple[str, ...]) -> ConceptNameMapper:
    """One mapper per vocabulary per process (the converter asks for it once per file)."""
    return ConceptNameMapper(names)


# ---------------------------------------------------------------------------------------------
# Users' own taggers: "module:function"
# ---------------------------------------------------------------------------------------------

#: What a tagger hook is: ``(encoded image bytes, caption) -> concept names``.
Tagger = Callable[[bytes, str], Sequence[str]]


@lru_cache(maxsize=8)
def load_tagger(spec: str) -> Tagger:
    """Import ``module:function`` or ``path/to/file.py:function`` and return the function.

    A module is found as ``python -m`` would find it, in the current directory first
    (:func:`import_from_cwd`). Errors are ``ValueError`` naming the spec and what to fix.
    """
    module_name, colon, function_name = spec.rpartition(":")
    if not colon or not module_name or not function_name:
        raise ValueError(
            f"--tagger {spec!r}: expected MODULE:FUNCTION (e.g. mytags.detector:tag_image) or "
            "path/to/file.py:FUNCTION"
        )
    try:
        if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
            path = Path(module_name).resolve()
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist")
            import_spec = importlib.util.spec_from_file_location(
                f"_cabs_tagger_{path.stem}", path
            )
            if import_spec is None or import_spec.loader is None:
                raise ImportError(f"{path} cannot be imported as a Python module")
            module = importlib.util.module_from_spec(import_spec)
            import_spec.loader.exec_module(module)
        else:
            module = import_from_cwd(module_name)
    except Exception as err:
        raise ValueError(
            f"--tagger {spec!r}: cannot import {module_name!r} ({type(err).__name__}: {err}); "
            "check that the module is importable from the current directory or give a .py path"
        ) from err
    function = getattr(module, function_name, None)
    if function is None:
        raise ValueError(f"--tagger {spec!r}: {module_name!r} has no attribute {function_name!r}")
    if not callable(function):
        raise ValueError(
            f"--tagger {spec!r}: {module_name}.{function_name} is a "
            f"{type(function).__name__}, not a function (image_bytes, caption) -> names"
        )
    return function


def import_from_cwd(name: str) -> ModuleType:
    """Import ``name``, looking in the current directory first, as ``python -m`` does.

    Without editing ``sys.path``: when the top-level package of ``name`` is not imported yet and
    the current directory holds it, it is loaded from there and registered in ``sys.modules``,
    so its submodules import as usual; otherwise the normal import path decides.
    """
    top = name.partition(".")[0]
    if top not in sys.modules:
        found = importlib.machinery.PathFinder.find_spec(top, [os.getcwd()])
        if found is not None and found.loader is not None:
            module = importlib.util.module_from_spec(found)
            sys.modules[top] = module
            try:
                found.loader.exec_module(module)
            except BaseException:
                del sys.modules[top]
                raise
    return importlib.import_module(name)


def check_tagger_output(spec: str, label: str, names: object) -> list[str]:
    """Validate what a tagger returned for sample ``label``: a list (or tuple) of names."""
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        shown = json.dumps(names, default=repr)[:200]
        raise ValueError(
            f"--tagger {spec!r} returned {shown} for sample {label!r}; it must return a list of "
            "concept names (str), [] when it finds none"
        )
    return list(names)
