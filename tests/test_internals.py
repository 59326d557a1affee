"""The one list of Streaming and Composer internals: versions checked, missing ones named."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest
from paths import ROOT, SAMPLE

from cabs_streaming import _internals
from cabs_streaming.dataset import ConceptStreamingDataset


def test_the_pinned_versions_are_installed_and_match_pyproject() -> None:
    assert _internals.check_versions() == []
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    for name, version in _internals.PINNED.items():
        assert f'"{name}=={version}"' in pyproject


def test_another_version_warns_once_naming_both_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(_internals.PINNED, "mosaicml", "0.0.1")
    with pytest.warns(RuntimeWarning, match=r"mosaicml 0\.32\.1 \(pinned 0\.0\.1\)"):
        _internals._warn_about_versions()


def test_a_moved_internal_fails_naming_it_and_the_pinned_versions() -> None:
    class Saver:
        remote_uploader = object()

    with pytest.raises(_internals.InternalsMoved, match="has no folder, filename") as info:
        _internals.require_saver(Saver())
    assert "mosaicml==0.32.1" in str(info.value) and "_internals.py" in str(info.value)


def test_the_dataset_accessors_read_the_installed_streaming() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no version warning either
        dataset = ConceptStreamingDataset(local=str(SAMPLE / "eval_retrieval"), batch_size=1)
    shard = _internals.shard_of_sample(dataset, dataset.num_samples - 1)
    assert shard == dataset.num_shards - 1
    assert _internals.stream_of_shard(dataset, shard).local == str(SAMPLE / "eval_retrieval")
    assert _internals.shard_basename(dataset, shard).endswith(".mds")
    (raw, _), *_ = _internals.shard_files(dataset, shard)
    assert raw.basename == _internals.shard_basename(dataset, shard)
    assert _internals.shared_memory_prefix(dataset) >= 0
    assert "locals" in _internals.shared_memory_names()


def _private_attributes(path: Path) -> set[str]:
    """``obj._name`` accesses in a module, ``self._...`` and ``cls._...`` aside."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
        ):
            found.add(node.attr)
    return found


def test_no_module_but_the_list_reaches_into_private_attributes() -> None:
    """Only ``super()._resume_incr_epoch`` (the overridden hook itself) is left elsewhere."""
    for path in sorted((ROOT / "cabs_streaming").rglob("*.py")):
        if path.name != "_internals.py":
            assert _private_attributes(path) <= {"_resume_incr_epoch"}, path
