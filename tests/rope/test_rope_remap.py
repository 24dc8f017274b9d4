"""relative_positions against hand-computed matrices from the papers' definitions, and bad input."""

from __future__ import annotations

import pytest
import torch

import longkit
from longkit.errors import MethodError
from longkit.rope import REMAPS, relative_positions

X = -1  # not attended


def test_every_remap_is_listed():
    assert set(REMAPS) == {"self_extend", "rerope", "leaky_rerope", "lm_infinite", "dca"}
    assert longkit.rope.relative_positions is relative_positions


def test_self_extend_matches_the_paper_g2_w4():
    # Jin et al. 2024: d inside the window W, else i//G - j//G + W - W//G.
    want = torch.tensor([
        [0, X, X, X, X, X, X, X],
        [1, 0, X, X, X, X, X, X],
        [2, 1, 0, X, X, X, X, X],
        [3, 2, 1, 0, X, X, X, X],
        [4, 3, 2, 1, 0, X, X, X],
        [4, 4, 3, 2, 1, 0, X, X],
        [5, 5, 4, 3, 2, 1, 0, X],
        [5, 5, 4, 4, 3, 2, 1, 0],
    ])
    got = relative_positions("self_extend", 8, group_size=2, window=4)
    assert got.dtype == torch.int64 and torch.equal(got, want)


def test_self_extend_limits():
    d = torch.arange(40)[:, None] - torch.arange(40)[None, :]
    plain = d.masked_fill(d < 0, -1)
    # G = 1: the shift W - W//G is 0 and nothing is grouped
    assert torch.equal(relative_positions("self_extend", 40, group_size=1, window=7), plain)
    # G beyond the length: every far key sits at distance W, which is ReRoPE (datamllab/LongLM#40)
    assert torch.equal(relative_positions("self_extend", 40, group_size=64, window=7),
                       relative_positions("rerope", 40, window=7))
    # grouped distances continue from the window and never decrease along a row
    rel = relative_positions("self_extend", 40, group_size=3, window=5)
    for i in range(40):
        row = rel[i, : i + 1].flip(0)
        assert row[:5].tolist() == list(range(min(5, i + 1)))
        assert bool((row[1:] >= row[:-1]).all())


def test_rerope_and_leaky_rerope():
    want = torch.tensor([
        [0, X, X, X, X, X],
        [1, 0, X, X, X, X],
        [2, 1, 0, X, X, X],
        [2, 2, 1, 0, X, X],
        [2, 2, 2, 1, 0, X],
        [2, 2, 2, 2, 1, 0],
    ])
    assert torch.equal(relative_positions("rerope", 6, window=2), want)
    leaky = relative_positions("leaky_rerope", 6, window=2, leak=2.0)
    assert leaky.dtype == torch.float64
    assert leaky[5].tolist() == [3.5, 3.0, 2.5, 2.0, 1.0, 0.0]
    assert leaky[2].tolist() == [2.0, 1.0, 0.0, -1.0, -1.0, -1.0]
    # the default leak is the reference code's k = 16
    assert relative_positions("leaky_rerope", 40, window=4)[39, 0].item() == pytest.approx(4 + 35 / 16)


def test_lm_infinite_lambda_mask_and_cap():
    got = relative_positions("lm_infinite", 7, window=3, n_sinks=1)
    # the sink (column 0) is seen from every row, at the cap L = 3; other keys only inside the window
    want = torch.tensor([
        [0, X, X, X, X, X, X],
        [1, 0, X, X, X, X, X],
        [2, 1, 0, X, X, X, X],
        [3, 2, 1, 0, X, X, X],
        [3, X, 2, 1, 0, X, X],
        [3, X, X, 2, 1, 0, X],
        [3, X, X, X, 2, 1, 0],
    ])
    assert torch.equal(got, want)


def test_dca_intra_successive_inter():
    # s = 4, w = 1 -> chunks of c = 3; keys at j mod 3; queries at i mod 3 (own chunk), min(i mod 3 + 3, 4)
    # (previous chunk), min(2c - 1, s) = 4 (older chunks).
    got = relative_positions("dca", 9, chunk_size=4, local_window=1)
    assert got[2].tolist() == [2, 1, 0, X, X, X, X, X, X]
    assert got[4].tolist() == [4, 3, 2, 1, 0, X, X, X, X]
    assert got[5].tolist() == [4, 3, 2, 2, 1, 0, X, X, X]
    assert got[6].tolist() == [4, 3, 2, 3, 2, 1, 0, X, X]
    assert got[8].tolist() == [4, 3, 2, 4, 3, 2, 2, 1, 0]
    # no distance ever exceeds the chunk size, and the own chunk keeps exact distances
    big = relative_positions("dca", 200, chunk_size=24, local_window=4)
    assert int(big.max()) <= 24
    i, j = torch.arange(200)[:, None], torch.arange(200)[None, :]
    same = (i // 20 == j // 20) & (j <= i)
    assert torch.equal(big[same], (i - j).expand(200, 200)[same])


@pytest.mark.parametrize(
    "name,length,params,match",
    [
        ("self_extend", 16, {"group_size": 0, "window": 4}, r"'group_size' must be an int >= 1 \(got 0\)"),
        ("self_extend", 16, {"group_size": 2, "window": 16}, r"'window' must be < length = 16 \(got 16\)"),
        ("self_extend", 16, {"group_size": 2, "window": 0}, r"'window' must be an int >= 1"),
        ("rerope", 8, {"window": 9}, r"'window' must be < length = 8"),
        ("leaky_rerope", 16, {"window": 4, "leak": 1.0}, r"'leak' must be > 1"),
        ("lm_infinite", 16, {"window": 4, "n_sinks": -1}, r"'n_sinks' must be an int >= 0"),
        ("dca", 16, {"chunk_size": 4, "local_window": 4}, r"'local_window' must be < chunk_size = 4"),
        ("dca", 16, {"chunk_size": 4}, r"local_window"),
        ("self_extend", 0, {"group_size": 2, "window": 4}, r"'length' must be an int >= 1"),
        ("selfextend", 16, {}, r"unknown position remap 'selfextend'; valid remaps: dca, leaky_rerope"),
    ],
)
def test_bad_input_names_the_parameter_and_range(name, length, params, match):
    with pytest.raises(MethodError, match=match):
        relative_positions(name, length, **params)


def test_lm_infinite_defaults_agree_with_the_attention_method():
    """relative_positions("lm_infinite") must describe what attention=lm_infinite runs when neither is given n_sinks."""
    from longkit.attention.lm_infinite import LMInfinite

    method = LMInfinite()
    got = relative_positions("lm_infinite", 300, window=64)
    assert torch.equal(got, relative_positions("lm_infinite", 300, window=64, n_sinks=method.n_sinks))
    # 100 sinks: a query at 299 still sees key 99 (a sink) at the cap and not key 100
    assert int(got[299, 99]) == 64 and int(got[299, 100]) < 0
