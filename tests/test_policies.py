"""The policies beyond the paper (docs/selection.md: target distributions, mixed, balanced,
schedules, filters): hand-worked examples, the spec's limits, and the fast engine against the
slow transcription in ``selection_reference`` on random superbatches."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import selection_reference as ref
from hypothesis import given
from hypothesis import strategies as st
from test_selection import PROPERTY_SETTINGS, dataset_counts, superbatches

from cabs_streaming.concepts import ragged_from_lists
from cabs_streaming.config import ConfigError, SelectionConfig, build_policy
from cabs_streaming.selection import (
    Balanced,
    DatasetFacts,
    Filter,
    Filtered,
    Mixed,
    Schedule,
    _kernels,
    get_policy,
    select,
    select_invariant,
    stand_ins,
)


def run(policy, lists, world, k, seed=0, step=0, columns=None):
    offsets, ids = ragged_from_lists(lists)
    return select(policy, offsets, ids, world=world, k=k, seed=seed, step=step, columns=columns)


def kept(policy, lists, world, k, seed=0, step=0, columns=None):
    return run(policy, lists, world, k, seed, step, columns).kept.tolist()


def facts(lists, names=None) -> DatasetFacts:
    return DatasetFacts(concept_samples=dataset_counts(lists), names=names)


def vocabulary_size(lists) -> int:
    return max((c for items in lists for c in items), default=-1) + 1


# ------------------------------------------------------------------ target distributions


def test_weighted_targets_by_hand():
    # b = 6, M = 4, present concepts 0, 1, 2 with weights 3, 2, 1 (W = 6): q = 3, 2, 1, exact.
    table, present = _kernels.weighted_concept_table(
        np.array([5, 5, 5]), np.array([3.0, 2.0, 1.0]), 6, 4
    )
    assert present == 3
    assert table[:, 1].tolist() == [3.0, 2.0, 1.0]
    # b = 5, weights 1, 1, 2 (W = 4): q = 1.25, 1.25, 2.5 -> floors 1, 1, 2 (4), one left for
    # the largest remainder, concept 2 (0.5): t = 1, 1, 3.
    table, _ = _kernels.weighted_concept_table(np.array([1, 1, 1]), np.array([1.0, 1.0, 2.0]), 5, 4)
    assert table[:, 1].tolist() == [1.0, 1.0, 3.0]
    # A concept absent from the superbatch gets no target and no share: b = 4 over 0 and 2.
    table, present = _kernels.weighted_concept_table(
        np.array([2, 0, 2]), np.array([1.0, 100.0, 3.0]), 4, 4
    )
    assert present == 2 and table[:, 1].tolist() == [1.0, 0.0, 3.0]
    # Weight 0 still gets the minimum target 1; the cap bounds the head: b = 10, M = 3.
    table, _ = _kernels.weighted_concept_table(np.array([1, 1]), np.array([0.0, 1.0]), 10, 3)
    assert table[:, 1].tolist() == [1.0, 3.0]


@PROPERTY_SETTINGS
@given(st.lists(st.integers(0, 5), min_size=1, max_size=12), st.integers(1, 40), st.integers(1, 9))
def test_equal_weights_give_exactly_the_uniform_targets(doc_freq, b, cap):
    doc_freq = np.array(doc_freq, dtype=np.int32)
    uniform, k1 = _kernels.concept_table(doc_freq, b, cap)
    weighted, k2 = _kernels.weighted_concept_table(doc_freq, np.ones(len(doc_freq)), b, cap)
    assert k1 == k2
    assert np.array_equal(uniform, weighted)


@PROPERTY_SETTINGS
@given(superbatches(), st.one_of(st.none(), st.integers(1, 4)))
def test_alpha_zero_is_uniform_dm(batch, cap):
    lists, world, k, seed, step = batch
    alpha0 = get_policy("diversity", {"alpha": 0.0, "concept_cap": cap}).bind(facts(lists))
    uniform = get_policy("diversity", {"concept_cap": cap})
    assert kept(alpha0, lists, world, k, seed, step) == kept(uniform, lists, world, k, seed, step)


@PROPERTY_SETTINGS
@given(superbatches(), st.sampled_from([0.0, 0.5, 1.0]), st.one_of(st.none(), st.integers(1, 4)))
def test_alpha_targets_match_the_reference(batch, alpha, cap):
    lists, world, k, seed, step = batch
    counts = dataset_counts(lists)
    policy = get_policy("diversity", {"alpha": alpha, "concept_cap": cap}).bind(facts(lists))
    weights = [float(c) ** alpha for c in counts]
    assert kept(policy, lists, world, k, seed, step) == ref.general_dm(
        lists, world, k, seed, step, concept_cap=cap, weights=weights
    )


def test_alpha_one_lets_the_head_keep_more_than_uniform():
    # 12 samples of concept 0 (dataset count 100), 12 of concept 1 (count 1), keep 8, M = 8.
    # Uniform: t = 4 and 4; the greedy alternates (the lower count wins): 4 + 4.
    # alpha = 1: q = 800/101 = 7.92 and 0.08 -> floors 7, 0; the one left goes to the larger
    # remainder (concept 0): 8, then clamp t_1 to 1; 9 > 8 rescales to 8 * 8 // 9 = 7 and 1.
    lists = [[0]] * 12 + [[1]] * 12
    counts = DatasetFacts(concept_samples=np.array([100, 1]))
    uniform = get_policy("diversity", {"concept_cap": 8})
    natural = get_policy("diversity", {"concept_cap": 8, "alpha": 1.0}).bind(counts)
    first = run(uniform, lists, 1, 8)
    second = run(natural, lists, 1, 8)
    zeros_first = sum(1 for j in first.kept[0] if lists[j] == [0])
    zeros_second = sum(1 for j in second.kept[0] if lists[j] == [0])
    assert zeros_first == 4
    assert zeros_second == 7


def test_weights_file_by_name_with_a_default(tmp_path):
    path = tmp_path / "weights.json"
    path.write_text(json.dumps({"cat": 3, "*": 1}))
    policy = get_policy("diversity", {"weights": str(path)}).bind(
        DatasetFacts(names=("cat", "dog", "bird"))
    )
    assert policy.target_weights.tolist() == [3.0, 1.0, 1.0]
    assert policy.config() == {
        "name": "diversity", "concept_cap": None, "official_compat": False,
        "weights": str(path),
    }


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"cat": 1}, "gives no weight to 2 concept"),
        ({"cat": 1, "*": -1}, "must be a finite number >= 0"),
        ({"lion": 1, "*": 1}, "'lion' is not a concept"),
        ([1, 2, 3], "must hold a JSON object"),
    ],
)
def test_bad_weights_files_are_named(tmp_path, content, message):
    path = tmp_path / "w.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message):
        get_policy("diversity", {"weights": str(path)}).bind(
            DatasetFacts(names=("cat", "dog", "bird"))
        )


def test_alpha_without_counts_and_unbound_use_are_clear_errors():
    with pytest.raises(ValueError, match="needs the dataset-wide concept counts"):
        get_policy("diversity", {"alpha": 0.5}).bind(DatasetFacts(source="my data"))
    with pytest.raises(ValueError, match="call policy.bind"):
        run(get_policy("diversity", {"alpha": 0.5}), [[0], [1]], 1, 1)
    with pytest.raises(ValueError, match="alpha must lie in"):
        get_policy("diversity", {"alpha": 1.5})
    with pytest.raises(ValueError, match="either alpha or weights"):
        get_policy("diversity", {"alpha": 0.5, "weights": "w.json"})


# ---------------------------------------------------------------------------------- mixed


def test_mixed_by_hand():
    # b = 2 (world 1, k = 2), M = 1 per concept, K = 4 > b: every t_c = 1.
    # s0 [0] F0 = 1: gain 2.  s1 [1, 2, 3]: F = 1 each, gain 2.  s2 [1]: F1 = 2 -> 1.5.
    # L_max = 3. lambda = 0: s0 and s1 tie at 2 -> s0 (lower index); then s1 (2) -> [0, 1].
    # lambda = 3: s0 = 2 + 1 = 3, s1 = 2 + 3 = 5, s2 = 1.5 + 1 = 2.5 -> s1, then s0 -> [0, 1].
    # keep 1 instead: lambda 0 keeps s0, lambda 3 keeps s1.
    lists = [[0], [1, 2, 3], [1]]
    assert kept(get_policy("mixed", {"lambda": 0.0}), lists, 1, 1) == [[0]]
    assert kept(get_policy("mixed", {"lambda": 3.0}), lists, 1, 1) == [[1]]
    # lambda = 0.5: s0 = 2 + 0.5 / 3 = 2.1667 < s1 = 2 + 0.5 = 2.5 -> s1 already.
    assert kept(get_policy("mixed", {"lambda": 0.5}), lists, 1, 1) == [[1]]


@PROPERTY_SETTINGS
@given(superbatches(), st.one_of(st.none(), st.integers(1, 4)))
def test_mixed_at_lambda_zero_is_dm(batch, cap):
    lists, world, k, seed, step = batch
    dm = get_policy("diversity", {"concept_cap": cap})
    mixed = get_policy("mixed", {"lambda": 0.0, "concept_cap": cap})
    assert kept(mixed, lists, world, k, seed, step) == kept(dm, lists, world, k, seed, step)


@PROPERTY_SETTINGS
@given(
    superbatches(), st.sampled_from([0.0, 0.3, 1.0, 7.5]), st.one_of(st.none(), st.integers(1, 4))
)
def test_mixed_matches_the_reference(batch, lam, cap):
    lists, world, k, seed, step = batch
    policy = get_policy("mixed", {"lambda": lam, "concept_cap": cap})
    assert kept(policy, lists, world, k, seed, step) == ref.general_dm(
        lists, world, k, seed, step, concept_cap=cap, lam=lam
    )


def test_mixed_with_a_large_lambda_ranks_like_fm_within_the_cap():
    rng = np.random.default_rng(5)
    lists = [rng.integers(0, 50, size=rng.integers(0, 7)).tolist() for _ in range(400)]
    world, k = 4, 20
    fm = run("frequency", lists, world, k)
    mixed = run(get_policy("mixed", {"lambda": 1e6, "concept_cap": 10**6}), lists, world, k)
    n = len(lists) // world
    for rank in range(world):
        fm_lengths = sorted(len(lists[rank * n + j]) for j in fm.kept[rank])
        mixed_lengths = sorted(len(lists[rank * n + j]) for j in mixed.kept[rank])
        assert fm_lengths == mixed_lengths  # the same object counts; ties may differ


def test_mixed_refuses_bad_lambda_and_compat():
    with pytest.raises(ValueError, match="lambda must be a finite number >= 0"):
        get_policy("mixed", {"lambda": -1})
    with pytest.raises(ValueError, match="no official_compat form"):
        get_policy("mixed", {"official_compat": True})
    assert Mixed(lam=2.0).config()["lambda"] == 2.0


# ------------------------------------------------------------------------------- balanced


def test_balanced_probability_by_hand():
    # t = 10: N = {0: 5, 1: 20, 2: 40}: min(1, t/N) = 1, 0.5, 0.25.
    # s0 [1] -> 0.5; s1 [1, 2, 2] -> 1 - 0.5 * 0.75 = 0.625; s2 [0, 2] -> 1; s3 [] -> 0.
    offsets, ids = ragged_from_lists([[1], [1, 2, 2], [0, 2], []])
    d_offsets, d_ids, _ = _kernels.distinct_lists(offsets, ids.astype(np.int32), 3)
    p = _kernels.balanced_probability(
        d_offsets, d_ids, np.array([5.0, 20.0, 40.0]), 10.0, _kernels.NO_FILTER
    )
    assert p.tolist() == [0.5, 0.625, 1.0, 0.0]


@PROPERTY_SETTINGS
@given(superbatches(), st.sampled_from([0.5, 1.0, 3.0, 100.0]))
def test_balanced_matches_the_reference_and_keeps_exactly_k(batch, threshold):
    lists, world, k, seed, step = batch
    policy = Balanced(threshold=threshold).bind(facts(lists))
    result = run(policy, lists, world, k, seed, step)
    assert result.kept.shape == (world, k)
    assert result.kept.tolist() == ref.balanced(
        lists, world, k, seed, step, dataset_counts(lists).tolist(), threshold
    )


@PROPERTY_SETTINGS
@given(superbatches())
def test_balanced_with_a_threshold_above_every_count_is_iid(batch):
    lists, world, k, seed, step = batch
    lists = [items or [0] for items in lists]  # every sample has a concept
    counts = dataset_counts(lists)
    policy = Balanced(threshold=float(counts.max()) + 1).bind(facts(lists))
    assert kept(policy, lists, world, k, seed, step) == kept("iid", lists, world, k, seed, step)


def test_balanced_holds_the_head_back():
    # 90 samples of a head concept (dataset count 9,000) and 30 of a tail one (count 30), keep
    # 40 with t = 30: p(head) = 30 / 9000, p(tail) = 1: all 30 tail samples are kept, and
    # IID keeps about 10.
    lists = [[0]] * 90 + [[1]] * 30
    lists = [lists[i] for i in np.random.default_rng(0).permutation(120)]
    policy = Balanced(threshold=30).bind(DatasetFacts(concept_samples=np.array([9000, 30])))
    tail = sum(1 for j in kept(policy, lists, 1, 40)[0] if lists[j] == [1])
    iid_tail = sum(1 for j in kept("iid", lists, 1, 40)[0] if lists[j] == [1])
    assert tail == 30
    assert iid_tail < 20


def test_balanced_needs_counts():
    with pytest.raises(ValueError, match="concept_counts.json"):
        Balanced(threshold=5).bind(DatasetFacts())
    with pytest.raises(ValueError, match="threshold must be a positive number"):
        Balanced(threshold=0)


# -------------------------------------------------------------------------------- filters


def column_strategy(size: int):
    return st.lists(
        st.one_of(st.just(math.nan), st.floats(0, 1, allow_nan=False)), min_size=size,
        max_size=size,
    )


@st.composite
def filtered_batches(draw):
    lists, world, k, seed, step = draw(superbatches())
    values = draw(column_strategy(len(lists)))
    lo = draw(st.one_of(st.none(), st.floats(0, 1)))
    top = draw(st.one_of(st.none(), st.sampled_from([0.25, 0.5, 1.0])))
    if lo is None and top is None:
        lo = 0.5
    return lists, world, k, seed, step, np.array(values), Filter("score", min=lo, top=top)


def allowed_of(values, f: Filter) -> list[bool]:
    n = len(values)
    ok = [not math.isnan(v) and (f.min is None or v >= f.min) for v in values]
    if f.top is not None:
        count = min(n, math.ceil(f.top * n))
        ranked = sorted(range(n), key=lambda i: (-(values[i] if not math.isnan(values[i])
                                                   else -math.inf), i))
        top = set(ranked[:count])
        ok = [o and i in top for i, o in enumerate(ok)]
    return ok


@PROPERTY_SETTINGS
@given(filtered_batches(), st.sampled_from(["diversity", "mixed", "iid", "frequency", "balanced"]))
def test_filters_match_the_reference_for_every_policy(batch, name):
    lists, world, k, seed, step, values, f = batch
    allowed = allowed_of(values.tolist(), f)
    inner = get_policy(name, {"threshold": 2.0} if name == "balanced" else {}).bind(facts(lists))
    result = run(Filtered(inner, (f,)), lists, world, k, seed, step, {"score": values})
    n = len(lists) // world
    assert result.kept.shape == (world, k)
    if name == "diversity":
        expected = ref.general_dm(lists, world, k, seed, step, allowed=allowed)
    elif name == "mixed":
        expected = ref.general_dm(lists, world, k, seed, step, lam=1.0, allowed=allowed)
    elif name == "balanced":
        expected = ref.balanced(
            lists, world, k, seed, step, dataset_counts(lists).tolist(), 2.0, allowed
        )
    elif name == "iid":
        expected = []
        for rank in range(world):
            order = ref.seeded_order(seed, step, len(lists), rank, n)
            passing = [j for j in order if allowed[rank * n + j]]
            failing = [j for j in order if not allowed[rank * n + j]]
            expected.append(sorted((passing + failing)[:k]))
    else:
        expected = []
        for rank in range(world):
            passing = [j for j in range(n) if allowed[rank * n + j]]
            best = sorted(passing, key=lambda j: (-len(lists[rank * n + j]), j))[:k]
            order = ref.seeded_order(seed, step, len(lists), rank, n)
            rest = [j for j in order if not allowed[rank * n + j]][: k - len(best)]
            expected.append(sorted(best + rest))
    assert result.kept.tolist() == expected
    failing_kept = sum(
        not allowed[rank * n + j] for rank in range(world) for j in result.kept[rank]
    )
    assert result.stats.filter_shortfall == failing_kept
    assert result.stats.filtered_out == allowed.count(False)
    # Stand-ins: every unkept sample once, the passing ones first.
    built = Filtered(inner, (f,))
    offsets, ids = ragged_from_lists(lists)
    for rank in range(world):
        order = stand_ins(built, offsets, ids, world, result.kept, rank, seed, step,
                          columns={"score": values}).tolist()
        assert sorted(order) == sorted(set(range(n)) - set(result.kept[rank].tolist()))
        flags = [allowed[rank * n + j] for j in order]
        assert flags == sorted(flags, reverse=True)


def test_filters_by_hand_and_the_shortfall():
    # 2 ranks x 3; keep 2 per rank; clip score >= 0.5. Rank 0 passes s0 and s2; rank 1 only s4
    # (s3 is NaN, s5 = 0.1): rank 1 keeps s4 and one failing sample from the fill.
    lists = [[0], [1], [2], [3], [4], [5]]
    scores = np.array([0.9, 0.2, 0.6, np.nan, 0.7, 0.1])
    policy = Filtered(get_policy("diversity"), (Filter("clip_score", min=0.5),))
    result = run(policy, lists, 2, 2, seed=1, step=2, columns={"clip_score": scores})
    assert result.kept[0].tolist() == [0, 2]
    assert 1 in result.kept[1].tolist()  # local index of s4
    assert result.stats.filter_shortfall == 1
    assert result.stats.filtered_out == 3
    # top: the 2 highest of 6 (ceil(0.3 * 6) = 2) are s0 and s4.
    top = Filtered(get_policy("frequency"), (Filter("clip_score", top=0.3),))
    result = run(top, lists, 2, 1, columns={"clip_score": scores})
    assert result.kept.tolist() == [[0], [1]]


def test_filter_errors_are_named():
    with pytest.raises(ValueError, match="does not carry"):
        run(Filtered(get_policy("iid"), (Filter("aesthetic", min=5),)), [[0], [1]], 1, 1)
    with pytest.raises(ValueError, match="needs min, max or top"):
        Filter("x")
    with pytest.raises(ValueError, match="top must lie in"):
        Filter("x", top=1.5)
    with pytest.raises(ValueError, match="min 2 > max 1"):
        Filter("x", min=2, max=1)
    with pytest.raises(ValueError, match="one value per sample"):
        run("iid", [[0], [1]], 1, 1, columns={"x": [1.0]})


# ------------------------------------------------------------------------------ schedules


def schedule(entries):
    return Schedule.from_config(entries, get_policy)


def test_schedule_phases_by_steps_epochs_and_fractions():
    s = schedule([
        {"until": "10ba", "policy": "frequency"},
        {"until": "2ep", "policy": "diversity", "options": {"concept_cap": 3}},
        {"until": 0.75, "policy": "iid"},
        {"policy": "mixed", "ramp": {"option": "lambda", "from": 0.0, "to": 2.0}},
    ]).resolve(batches_per_epoch=8, max_batches=40)
    assert [p.stop for p in s.phases] == [10, 16, 30, 40]
    assert s.policy_at(0).name == "frequency" and s.policy_at(9).name == "frequency"
    assert s.policy_at(10).config() == get_policy("diversity", {"concept_cap": 3}).config()
    assert s.policy_at(16).name == "iid" and s.policy_at(29).name == "iid"
    # The ramp runs from step 30 (lambda 0) to 40 (lambda 2): step 35 -> 1.0, after -> 2.0.
    assert s.policy_at(30).lam == 0.0
    assert s.policy_at(35).lam == 1.0
    assert s.policy_at(45).lam == 2.0


@PROPERTY_SETTINGS
@given(superbatches())
def test_a_schedule_selects_what_its_phase_policy_selects(batch):
    lists, world, k, seed, step = batch
    s = schedule([{"until": "3ba", "policy": "frequency"}, {"policy": "diversity"}]).resolve(
        None, None
    )
    for at in (0, 2, 3, step):
        expected = "frequency" if at < 3 else "diversity"
        assert kept(s, lists, world, k, seed, at) == kept(expected, lists, world, k, seed, at)


def test_schedule_errors_are_named():
    with pytest.raises(ValueError, match="only the last phase may omit 'until'"):
        schedule([{"policy": "iid"}, {"policy": "diversity"}])
    with pytest.raises(ValueError, match="has no option 'lambda'"):
        schedule([{"policy": "diversity", "ramp": {"option": "lambda", "from": 0, "to": 1}}])
    with pytest.raises(ValueError, match="not after the phase before"):
        schedule([{"until": "5ba", "policy": "iid"}, {"until": "3ba", "policy": "iid"}]).resolve(
            None, None
        )
    with pytest.raises(ValueError, match="call schedule.resolve"):
        schedule([{"until": "1ep", "policy": "iid"}, {"policy": "iid"}]).policy_at(0)
    with pytest.raises(ValueError, match="not a training time"):
        schedule([{"until": "5 minutes", "policy": "iid"}, {"policy": "iid"}])
    with pytest.raises(ValueError, match="lambda must be a finite number"):
        schedule([{"policy": "mixed", "ramp": {"option": "lambda", "from": 0, "to": -1}}])


def test_config_builds_schedules_and_filters_with_shared_options():
    cfg = SelectionConfig(
        options={"concept_cap": 8},
        schedule=[{"until": "0.5dur", "policy": "diversity"}, {"policy": "frequency"}],
        filters=[{"column": "clip_score", "min": 0.28}],
    )
    policy = build_policy(cfg)
    assert isinstance(policy, Filtered)
    assert policy.required_columns() == ("clip_score",)
    phases = policy.config()["phases"]
    assert phases[0]["concept_cap"] == 8 and phases[1]["name"] == "frequency"
    assert policy.config()["filters"] == [{"column": "clip_score", "min": 0.28}]
    with pytest.raises(ConfigError, match="selection.filters: unknown filter key"):
        build_policy(SelectionConfig(filters=[{"column": "x", "minimum": 1}]))
    with pytest.raises(ConfigError, match="schedule phase 1: policy 'diversty'"):
        build_policy(SelectionConfig(schedule=[{"until": 3, "policy": "iid"},
                                               {"policy": "diversty"}]))


# ------------------------------------------------------------------- world-invariant mode


@PROPERTY_SETTINGS
@given(filtered_batches(), st.sampled_from(["mixed", "balanced", "diversity"]))
def test_new_policies_and_filters_are_world_invariant(batch, name):
    lists, world, k, seed, step, values, f = batch
    if world == 1:
        world = 2
        lists = lists + lists[::-1]
        values = np.concatenate([values, values[::-1]])
    n = len(lists) // world
    options = {"threshold": 2.0} if name == "balanced" else {}
    policy = Filtered(get_policy(name, options).bind(facts(lists)), (f,))
    indices = np.random.default_rng(seed % 1000).permutation(len(lists))
    offsets, ids = ragged_from_lists(lists)
    many = select_invariant(policy, offsets, ids, indices, world=world, k=k, seed=seed, step=step,
                            columns={"score": values})
    order = np.argsort(indices)
    one_offsets, one_ids = ragged_from_lists([lists[i] for i in order])
    one = select_invariant(policy, one_offsets, one_ids, indices[order], world=1, k=world * k,
                           seed=seed, step=step, columns={"score": values[order]})
    assert many.kept.tolist() == one.kept.tolist()
    assert n * world == len(lists)


# ------------------------------------------------------------ filters across gloo processes

#: Two ranks of 6 samples each; the score column is what the filters read.
GLOO_LISTS = [[0], [1, 1], [], [2], [0, 3], [4], [5], [1], [2, 2, 2], [], [3], [0]]
GLOO_SCORES = [0.9, 0.1, 0.8, np.nan, 0.7, 0.6, 0.2, 0.95, 0.3, 0.5, 0.4, 0.85]


def _filter_worker(rank: int, port: int, outs: list[str]) -> None:
    """One of two gloo ranks: gather ids and the score column, select with filters."""
    import torch
    from helpers import gloo_rank

    from cabs_streaming.algorithm import select_superbatch

    with gloo_rank(rank, 2, port):
        mine = slice(rank * 6, rank * 6 + 6)
        offsets, ids = ragged_from_lists(GLOO_LISTS[mine])
        batch = {
            "keys": [f"s{i}" for i in range(12)][mine],
            "concept_offsets": torch.from_numpy(offsets),
            "concept_ids": torch.from_numpy(ids),
            "columns": {"score": torch.tensor(GLOO_SCORES[mine], dtype=torch.float64)},
        }
        policy = Filtered(get_policy("mixed"), (Filter("score", min=0.5),))
        record = select_superbatch(batch, 7, policy=policy, filter_ratio=0.5, seed=3)
        stand_in = record.stand_ins(rank).tolist()
        torch.save(
            {"kept": record.kept.tolist(), "stats": record.result.stats, "stand_ins": stand_in},
            outs[rank],
        )


def test_filters_gather_their_column_across_gloo_ranks(tmp_path):
    import torch
    from helpers import free_port

    outs = [str(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.multiprocessing.start_processes(
        _filter_worker, args=(free_port(), outs), nprocs=2, start_method="spawn"
    )
    results = [torch.load(out, weights_only=False) for out in outs]
    policy = Filtered(get_policy("mixed"), (Filter("score", min=0.5),))
    columns = {"score": np.array(GLOO_SCORES)}
    expected = run(policy, GLOO_LISTS, 2, 3, seed=3, step=7, columns=columns)
    offsets, ids = ragged_from_lists(GLOO_LISTS)
    for rank, result in enumerate(results):
        assert result["kept"] == expected.kept.tolist()
        assert result["stats"].filtered_out == expected.stats.filtered_out == 5
        assert result["stats"].filter_shortfall == expected.stats.filter_shortfall
        assert result["stand_ins"] == stand_ins(
            policy, offsets, ids, 2, expected.kept, rank, 3, 7, columns=columns
        ).tolist()
