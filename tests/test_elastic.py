"""World-invariant selection without processes: the pure parts and the one-process step.

The global superbatch is simulated as it arrives after the all-gather: the same samples, spread
over 1, 2 or 4 ranks in any order (Streaming's relaxed partitioning gives each global batch the
same *set* of samples, not the same placement). The launcher tests are test_elastic_runs.py.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import noise_jpeg

from cabs_streaming.algorithm import (
    ConceptAwareBatchSampling,
    append_selection_log,
    cabs_step,
    decode_kept,
)
from cabs_streaming.dataset import CaptionTokenizer, ConceptCollator
from cabs_streaming.decode import ImageDecoder
from cabs_streaming.selection import (
    assign_to_ranks,
    get_policy,
    invariant_stand_ins,
    select,
    select_invariant,
)
from cabs_streaming.selection.invariant import canonical_order, reorder_ragged
from cabs_streaming.selection.sizes import superbatch_per_rank

POLICIES = [
    ("iid", {}),
    ("frequency", {}),
    ("diversity", {}),
    ("diversity", {"concept_cap": 3}),
    ("diversity", {"official_compat": True}),
]


def make_superbatch(seed: int, size: int, vocabulary: int = 12):
    """Global sample indices and concept lists of a superbatch drawn from a larger dataset."""
    rng = np.random.default_rng(seed)
    indices = rng.choice(10_000, size=size, replace=False)
    lists = [rng.integers(0, vocabulary, rng.integers(0, 5)).tolist() for _ in range(size)]
    return indices, lists


def spread(indices, lists, order):
    """The gathered, rank-major arrays of the samples placed in ``order``."""
    chosen = [lists[i] for i in order]
    offsets = np.zeros(len(chosen) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(c) for c in chosen])
    ids = np.array([c for sample in chosen for c in sample], dtype=np.int32)
    return offsets, ids, np.asarray(indices)[order]


@pytest.mark.parametrize(("name", "options"), POLICIES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kept_set_is_the_same_on_any_world_size_and_placement(name, options, seed):
    indices, lists = make_superbatch(seed, 80)
    policy = get_policy(name, options)
    rng = np.random.default_rng([seed, 99])
    kept_sets = []
    for world in (1, 2, 4, 8):
        for _ in range(3):  # three placements of the same samples over the ranks
            offsets, ids, where = spread(indices, lists, rng.permutation(80))
            chosen = select_invariant(policy, offsets, ids, where, world, 40 // world, 7, step=5)
            assert chosen.sources.shape == (world, 40 // world)
            assert sorted(where[chosen.sources.ravel()].tolist()) == chosen.kept.tolist()
            kept_sets.append(chosen.kept.tolist())
            assert (
                chosen.result.stats.kept_distinct
                == select_invariant(
                    policy, *spread(indices, lists, np.arange(80)), 1, 40, 7, step=5
                ).result.stats.kept_distinct
            )
    assert all(kept == kept_sets[0] for kept in kept_sets)
    assert len(set(kept_sets[0])) == 40


def test_rank_local_selection_is_not_world_invariant():
    """What the mode is for: rank-local quotas keep another set on another placement."""
    indices, lists = make_superbatch(3, 80)
    offsets, ids, where = spread(indices, lists, np.arange(80))
    two = select("frequency", offsets, ids, world=2, k=20, seed=7, step=5)
    four = select("frequency", offsets, ids, world=4, k=10, seed=7, step=5)
    as_set = {
        world: sorted(where[(r.kept + np.arange(world)[:, None] * (80 // world)).ravel()].tolist())
        for world, r in ((2, two), (4, four))
    }
    assert as_set[2] != as_set[4]
    invariant = [
        select_invariant("frequency", offsets, ids, where, w, 40 // w, 7, 5).kept for w in (2, 4)
    ]
    assert invariant[0].tolist() == invariant[1].tolist()


def test_randomness_follows_the_step_and_seed_not_the_rank():
    indices, lists = make_superbatch(4, 40)
    arrays = spread(indices, lists, np.arange(40))
    base = select_invariant("iid", *arrays, 2, 5, seed=1, step=3).kept
    assert select_invariant("iid", *arrays, 2, 5, seed=1, step=3).kept.tolist() == base.tolist()
    assert select_invariant("iid", *arrays, 2, 5, seed=1, step=4).kept.tolist() != base.tolist()
    assert select_invariant("iid", *arrays, 2, 5, seed=2, step=3).kept.tolist() != base.tolist()


def test_frequency_ties_go_to_the_lower_sample_index():
    # Four samples with one concept each, placed with the higher indices on rank 0.
    offsets = np.array([0, 1, 2, 3, 4])
    ids = np.array([0, 1, 2, 3], dtype=np.int32)
    indices = np.array([40, 30, 20, 10])
    chosen = select_invariant("frequency", offsets, ids, indices, world=2, k=1, seed=0, step=0)
    assert chosen.kept.tolist() == [10, 20]


@pytest.mark.parametrize("seed", range(20))
def test_assignment_gives_k_each_and_moves_only_the_surplus(seed):
    rng = np.random.default_rng(seed)
    world = int(rng.choice([1, 2, 3, 4, 8]))
    n, k = 10, int(rng.integers(1, 11))
    indices = rng.permutation(1000)[: world * n]
    kept = np.sort(rng.choice(world * n, size=world * k, replace=False))
    sources = assign_to_ranks(kept, indices, world, k)
    assert sources.shape == (world, k)
    assert sorted(sources.ravel().tolist()) == kept.tolist()
    loaded = np.bincount(kept // n, minlength=world)
    moved = int(np.count_nonzero(sources // n != np.arange(world)[:, None]))
    assert moved == int(np.maximum(loaded - k, 0).sum())  # the least any assignment moves
    for rank in range(world):  # a rank keeps its own lowest indices and gives away the rest
        own = kept[kept // n == rank]
        stays = np.sort(indices[own])[: min(k, own.size)]
        mine = sources[rank][sources[rank] // n == rank]
        assert sorted(indices[mine].tolist()) == stays.tolist()
        assert np.all(np.diff(indices[sources[rank]]) > 0)  # each row in sample-index order
    shuffled = assign_to_ranks(rng.permutation(kept), indices, world, k)
    assert np.array_equal(shuffled, sources)  # the order of the kept list does not matter


def test_assignment_moves_nothing_when_every_rank_kept_k():
    indices = np.arange(8)
    sources = assign_to_ranks(np.array([0, 1, 4, 5]), indices, world=2, k=2)
    assert sources.tolist() == [[0, 1], [4, 5]]


def test_assignment_fills_short_ranks_in_rank_order_with_the_lowest_surplus():
    indices = np.array([5, 1, 7, 3, 8, 9, 2, 6, 4, 0, 11, 10])  # 3 ranks of 4
    # rank 0 kept 4 (indices 1, 3, 5, 7), rank 1 kept none, rank 2 kept 2 (indices 0, 4)
    sources = assign_to_ranks(np.array([0, 1, 2, 3, 8, 9]), indices, world=3, k=2)
    assert indices[sources].tolist() == [[1, 3], [5, 7], [0, 4]]


def test_assignment_rejects_a_kept_count_that_does_not_split():
    with pytest.raises(ValueError, match="do not give 2 ranks 3 each"):
        assign_to_ranks(np.arange(5), np.arange(10), world=2, k=3)


def test_canonical_reordering_keeps_every_sample_with_its_concepts():
    offsets = np.array([0, 2, 2, 5])
    ids = np.array([1, 2, 3, 4, 5], dtype=np.int32)
    order = canonical_order([9, 4, 6])
    assert order.tolist() == [1, 2, 0]
    new_offsets, new_ids = reorder_ragged(offsets, ids, order)
    assert new_offsets.tolist() == [0, 0, 3, 5]
    assert new_ids.tolist() == [3, 4, 5, 1, 2]


def test_sample_indices_must_match_the_superbatch():
    with pytest.raises(ValueError, match="3 sample indices for a superbatch of 2"):
        select_invariant("iid", [0, 1, 2], [0, 1], [1, 2, 3], world=1, k=1, seed=0, step=0)


@pytest.mark.parametrize(("name", "options"), POLICIES[:3])
def test_stand_ins_are_the_ranks_own_unkept_samples_in_policy_order(name, options):
    indices, lists = make_superbatch(5, 40)
    offsets, ids, where = spread(indices, lists, np.random.default_rng(5).permutation(40))
    policy = get_policy(name, options)
    chosen = select_invariant(policy, offsets, ids, where, 2, 5, 3, 8)
    for rank in range(2):
        stand_ins = invariant_stand_ins(policy, offsets, ids, where, 2, chosen.sources, rank, 3, 8)
        own_kept = chosen.sources.ravel()
        own_kept = own_kept[own_kept // 20 == rank] - rank * 20
        assert sorted(stand_ins.tolist()) == sorted(set(range(20)) - set(own_kept.tolist()))
        again = invariant_stand_ins(policy, offsets, ids, where, 2, chosen.sources, rank, 3, 8)
        assert stand_ins.tolist() == again.tolist()


def test_global_batch_that_does_not_divide_the_new_world_size_names_the_keys():
    assert superbatch_per_rank(32, 4, 0.8) == 40
    with pytest.raises(ValueError, match="global_train_batch_size=32 does not divide over 3"):
        superbatch_per_rank(32, 3, 0.8)


def test_resuming_rank_local_selection_on_another_world_size_warns():
    cabs = ConceptAwareBatchSampling(
        decoder=ImageDecoder(32, is_train=True, seed=3, num_threads=1), filter_ratio=0.5
    )
    saved = {**cabs.state_dict(), "world_size": 2}
    with pytest.warns(UserWarning, match="resuming a checkpoint of 2 rank"):
        cabs.load_state_dict(saved)
    invariant = ConceptAwareBatchSampling(
        decoder=ImageDecoder(32, is_train=True, seed=3, num_threads=1), filter_ratio=0.5,
        world_invariant=True,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        invariant.load_state_dict({**invariant.state_dict(), "world_size": 2})
    with pytest.warns(UserWarning, match="different CABS configuration"):
        invariant.load_state_dict(saved)  # the checkpoint's selection was rank-local


# ------------------------------------------------------------------------ one process, real data


def samples(count: int) -> list[dict]:
    return [
        {
            "key": f"s{i}",
            "index": 100 - 7 * i,
            "image": noise_jpeg(i),
            "caption": f"caption {i}",
            "concepts": np.array([i % 3] * (i % 4)),
        }
        for i in range(count)
    ]


def test_collator_carries_the_global_sample_indices():
    batch = ConceptCollator()(samples(4))
    assert batch["sample_indices"].tolist() == [100, 93, 86, 79]
    assert "sample_indices" not in ConceptCollator()(
        [{k: v for k, v in s.items() if k != "index"} for s in samples(2)]
    )


def test_one_process_step_trains_on_the_invariant_kept_set(tmp_path: Path):
    batch = ConceptCollator()(samples(10))
    decoder = ImageDecoder(32, is_train=True, seed=3, num_threads=1)
    done = cabs_step(
        batch, 4, policy=get_policy("frequency"), filter_ratio=0.6, seed=1, decoder=decoder,
        tokenizer=CaptionTokenizer("ViT-B-32"), world_invariant=True,
    )  # fmt: skip
    # frequency keeps the 4 samples with the most instances: i % 4 == 3 (s3, s7), then
    # i % 4 == 2 (s2, s6); a tie goes to the lower sample index (s6 < s2).
    assert sorted(done.batch["keys"]) == ["s2", "s3", "s6", "s7"]
    assert done.indices == [batch["sample_indices"][int(k[1:])].item() for k in done.batch["keys"]]
    assert done.record.world_invariant and done.record.moved == 0
    assert done.batch["images"].shape == (4, 3, 32, 32)
    log = tmp_path / "selection.jsonl"
    append_selection_log(str(log), 4, done.batch["keys"], [], done.indices)
    record = json.loads(log.read_text())
    assert record == {"step": 4, "keys": [done.batch["keys"]], "indices": [done.indices]}


def test_crops_keyed_by_sample_do_not_depend_on_rank_or_slot():
    batch = ConceptCollator()(samples(4))
    tokenizer = CaptionTokenizer("ViT-B-32")
    decoder = ImageDecoder(32, is_train=True, seed=3, num_threads=2)
    first = decode_kept(
        batch, np.array([1, 3]), 6, 0, decoder=decoder, tokenizer=tokenizer, crop_keys=[93, 79]
    )
    second = decode_kept(
        batch, np.array([3, 0, 1]), 6, 1, decoder=decoder, tokenizer=tokenizer,
        crop_keys=[79, 100, 93],
    )  # fmt: skip
    assert torch.equal(first.batch["images"][0], second.batch["images"][2])
    assert torch.equal(first.batch["images"][1], second.batch["images"][0])
    assert first.indices == [93, 79]
    # Without keys the crop follows (rank, slot): the same image is cropped differently.
    plain = decode_kept(batch, np.array([3, 1]), 6, 0, decoder=decoder, tokenizer=tokenizer)
    assert not torch.equal(plain.batch["images"][0], first.batch["images"][1])


def test_world_invariant_step_without_sample_indices_says_what_is_missing():
    batch = ConceptCollator()([{k: v for k, v in s.items() if k != "index"} for s in samples(4)])
    decoder = ImageDecoder(32, is_train=True, seed=3, num_threads=1)
    with pytest.raises(ValueError, match="'sample_indices'"):
        cabs_step(
            batch, 0, policy=get_policy("iid"), filter_ratio=0.5, seed=1, decoder=decoder,
            world_invariant=True,
        )  # fmt: skip


# ------------------------------------------------------------- the exchange, two gloo processes

#: Rank 0 loads the six samples with the most instances (``i % 4`` of 2 and 3), which CABS-FM
#: keeps, so three of them move to rank 1.
RICH = ("s2", "s3", "s6", "s7", "s10", "s11")


def _exchange_worker(rank: int, port: int, out: str) -> None:
    """One of two gloo ranks: select world-invariantly and move what changes rank."""
    from helpers import gloo_rank

    from cabs_streaming.algorithm import exchange_kept, select_superbatch

    with gloo_rank(rank, 2, port):
        mine = [s for s in samples(12) if (s["key"] in RICH) == (rank == 0)]
        batch = ConceptCollator(tokenizer=CaptionTokenizer("ViT-B-32"))(mine)
        record = select_superbatch(
            batch, 3, policy=get_policy("frequency"), filter_ratio=0.5, seed=0,
            world_invariant=True,
        )  # fmt: skip
        joined, kept = exchange_kept(batch, record)
        rows = [
            [
                joined["keys"][i], int(joined["sample_indices"][i]),
                bytes(joined["image_bytes"][i]), joined["captions"][i], joined["text"][i].tolist(),
            ]
            for i in kept.tolist()
        ]  # fmt: skip
        torch.save({"rows": rows, "moved": record.moved, "bytes": record.moved_bytes}, out)


@pytest.mark.slow
def test_exchange_moves_bytes_captions_and_tokens_between_gloo_ranks(tmp_path: Path):
    from helpers import free_port

    outs = [str(tmp_path / f"rank{r}.pt") for r in range(2)]
    port = free_port()
    torch.multiprocessing.start_processes(
        _run_exchange_worker, args=(port, outs), nprocs=2, start_method="spawn"
    )
    results = [torch.load(out, weights_only=False) for out in outs]
    everything = {s["key"]: s for s in samples(12)}
    tokens = CaptionTokenizer("ViT-B-32")
    for result in results:
        assert result["moved"] == 3
        assert len(result["rows"]) == 3
        for key, index, image, caption, text in result["rows"]:
            sample = everything[key]
            assert (index, image, caption) == (sample["index"], sample["image"], sample["caption"])
            assert text == tokens([caption])[0].tolist()
    kept = [{row[0] for row in result["rows"]} for result in results]
    assert kept[0] | kept[1] == set(RICH) and not kept[0] & kept[1]
    # Rank 0 keeps its lowest sample indices (s11, s10, s7: 23, 30, 51) and gives away the rest.
    assert kept[0] == {"s7", "s10", "s11"}
    moved_keys = ("s2", "s3", "s6")
    expected = sum(
        len(k.encode()) + len(everything[k]["caption"].encode()) + len(everything[k]["image"])
        + 77 * 8
        for k in moved_keys
    )  # fmt: skip
    assert results[0]["bytes"] == results[1]["bytes"] == expected


def _run_exchange_worker(rank: int, port: int, outs: list[str]) -> None:
    _exchange_worker(rank, port, outs[rank])
