"""PoSE position ids: the official sampler's draws, the structural rules, the distributions, a model forward."""

import json
import random

import pytest
import torch

from conftest import FIXTURES, sample_ids
from longkit.errors import MethodError
from longkit.train.pose import pose_position_ids, pose_sample

OFFICIAL = json.loads((FIXTURES / "pose_official.json").read_text())


@pytest.mark.parametrize("case", OFFICIAL["cases"], ids=lambda c: f"n{c['length']}-L{c['window']}-T{c['target']}")
def test_matches_the_official_preprocessing_draw_for_draw(case):
    # The official function drew with random.seed(seed), three documents in a row, each truncated to 5 windows.
    rng = random.Random(case["seed"])
    n = min(case["length"], 5 * case["window"])
    for tokens, positions in zip(case["token_index"], case["position_ids"], strict=True):
        s = pose_sample(n, case["window"], case["target"], rng=rng)
        assert s.token_index.tolist() == tokens
        assert s.position_ids.tolist() == positions


@pytest.mark.parametrize("length,window,target", [(64, 16, 128), (16, 16, 16), (9, 16, 40), (2, 2, 3), (500, 33, 4096)])
def test_structure_of_every_draw(length, window, target):
    rng = random.Random(1)
    L = min(length, window)
    for _ in range(300):
        s = pose_sample(length, window, target, rng=rng)
        p, t = s.position_ids, s.token_index
        assert p.shape == t.shape == (L,)
        assert p[0] == 0 and int(p.max()) < target
        assert bool((p.diff() > 0).all()) and bool((t.diff() > 0).all())
        assert 1 <= s.first <= (L + 1) // 2
        # consecutive inside each chunk; the jump between them is exactly the skip
        assert p[: s.first].tolist() == list(range(s.first))
        assert p[s.first :].tolist() == list(range(s.first + s.skip, L + s.skip))
        assert t[: s.first].tolist() == list(range(s.first)) and int(t[-1]) < length
        assert t[s.first :].diff().eq(1).all()


def test_skip_and_first_chunk_are_uniform_over_their_ranges():
    # window 8, target 20: first chunk length uniform on 1..4, skip uniform on 0..12 (the reference's randint).
    rng = random.Random(7)
    n = 13000
    firsts, skips = torch.zeros(8), torch.zeros(20)
    for _ in range(n):
        s = pose_sample(8, 8, 20, rng=rng)
        firsts[s.first] += 1
        skips[s.skip] += 1
    assert firsts[0] == 0 and firsts[5:].sum() == 0 and skips[13:].sum() == 0
    assert (firsts[1:5] / n - 0.25).abs().max() < 0.02, firsts
    assert (skips[:13] / n - 1 / 13).abs().max() < 0.012, skips


def test_position_ids_and_sample_share_the_stream():
    a, b = random.Random(3), random.Random(3)
    for _ in range(20):
        assert torch.equal(pose_position_ids(12, 50, rng=a), pose_sample(12, 12, 50, rng=b).position_ids)
    assert torch.equal(pose_position_ids(12, 50, rng=5), pose_position_ids(12, 50, rng=5))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"length": 1, "window": 8, "target": 9}, "length"),
        ({"length": 10, "window": 1, "target": 9}, "window"),
        ({"length": 10, "window": 8, "target": 7}, "target"),
        ({"length": 10, "window": 8.0, "target": 9}, "window"),
        ({"length": 10, "window": True, "target": 9}, "window"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs, name):
    with pytest.raises(MethodError, match=f"'{name}'"):
        pose_sample(**kwargs, rng=0)


def test_bad_rng_is_refused():
    with pytest.raises(MethodError, match="'rng'"):
        pose_position_ids(8, 9, rng=torch.Generator())


def test_a_tiny_model_runs_on_pose_positions_and_they_change_the_logits(tiny_llama):
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=32)
    pos = pose_position_ids(32, 400, rng=random.Random(0))
    assert int(pos.max()) > 31
    with torch.inference_mode():
        plain = model(ids).logits
        skipped = model(ids, position_ids=pos[None]).logits
    assert torch.isfinite(skipped).all()
    first = int((pos.diff() != 1).nonzero()[0]) + 1
    # causal: the first chunk (positions 0..first-1, identical) is unchanged, the second chunk is not
    torch.testing.assert_close(skipped[:, :first], plain[:, :first])
    assert not torch.allclose(skipped[:, first:], plain[:, first:], atol=1e-4)
