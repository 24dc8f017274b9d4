"""MInference per-head patterns: each head equals its own pattern alone; the offline search picks the lowest error."""

import json

import pytest
import torch
from attention_helpers import qkv

import longkit
from conftest import sample_ids
from longkit.attention.a_shape import a_shape_attention
from longkit.attention.block_sparse import block_sparse_attention, block_sparse_select
from longkit.attention.minference import MInference, per_head_attention
from longkit.attention.sparse import dense_attention
from longkit.attention.vertical_slash import vertical_slash_attention, vertical_slash_select
from longkit.errors import MethodError
from longkit.tools.minference_search import search_patterns

AS = {"pattern": "a_shape", "sinks": 2, "window": 9, "block_q": 16}
VS = {"pattern": "vertical_slash", "vertical_size": 5, "slash_size": 4, "sinks": 1, "local": 2, "block": 16}
BS = {"pattern": "block_sparse", "block_size": 16, "top_k": 2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_head_equals_its_pattern_alone(dtype):
    q, k, v = qkv(83, 83, 2, dtype)
    out = per_head_attention(q, k, v, [VS, AS, {"pattern": "dense"}, BS], None, None)

    # Query head h reads key head h // 2.
    def alone(h):
        qh, kh, vh = q[:, h : h + 1], k[:, h // 2 : h // 2 + 1], v[:, h // 2 : h // 2 + 1]
        if h == 0:
            return vertical_slash_attention(
                qh, kh, vh, vertical_slash_select(qh, kh, 5, 4, sinks=1, local=2), block=16, reference=True
            )[0]
        if h == 1:
            return a_shape_attention(qh, kh, vh, 2, 9, block_q=16, reference=True)[0]
        if h == 2:
            return dense_attention(qh, kh, vh, None, None)
        return block_sparse_attention(qh, kh, vh, block_sparse_select(qh, kh, 2, 16), 16, reference=True)[0]

    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for h in range(4):
        torch.testing.assert_close(out[:, h].float(), alone(h)[:, 0].float(), **tol)


def test_search_picks_the_lowest_error_pattern_and_the_config_round_trips(tiny_llama, tmp_path):
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=96)
    found = search_patterns(model, ids, [AS, VS, {"pattern": "dense"}])
    # Dense is exact, so every head picks it with error 0 ...
    assert all(e == {"pattern": "dense"} for heads in found["layers"].values() for e in heads)
    assert all(err == 0 for errs in found["errors"].values() for err in errs)
    # ... and without it, each head gets whichever of the two sparse patterns has the smaller error.
    found = search_patterns(model, ids, [AS, VS])
    assert set(found["layers"]) == {"0", "1"} and all(len(h) == 4 for h in found["layers"].values())
    picked = {json.dumps(e, sort_keys=True) for heads in found["layers"].values() for e in heads}
    assert picked <= {json.dumps(AS, sort_keys=True), json.dumps(VS, sort_keys=True)}
    errs_as = search_patterns(model, ids, [AS])["errors"]
    errs_vs = search_patterns(model, ids, [VS])["errors"]
    for layer, errs in found["errors"].items():
        for h, err in enumerate(errs):
            assert err == pytest.approx(min(errs_as[layer][h], errs_vs[layer][h]))
            assert found["layers"][layer][h] == (AS if errs_as[layer][h] <= errs_vs[layer][h] else VS)
    # A file written from the search result drives the method and changes the logits.
    path = tmp_path / "patterns.json"
    path.write_text(json.dumps(found))
    with torch.inference_mode():
        before = model(ids).logits
        with longkit.apply(model, attention="minference", attention_args={"config": str(path)}):
            during = model(ids).logits
    assert not torch.allclose(before, during, atol=1e-4)


@pytest.mark.parametrize(
    "config,match",
    [
        ('{"0": [{"pattern": "nope"}]}', 'pattern" one of a_shape, vertical_slash, block_sparse, dense'),
        ('{"0": [{"pattern": "a_shape", "size": 3}]}', "unknown parameter for pattern 'a_shape'"),
        ('{"0": [{"pattern": "a_shape", "window": 0}]}', "parameter 'window' must be >= 1"),
        ('{"x": [{"pattern": "dense"}]}', "layer 'x' must be a layer index"),
        ("/no/such/file.json", "inline JSON or a JSON file"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_config_names_the_parameter(config, match):
    with pytest.raises(MethodError, match=match):
        MInference(config=config)


def test_head_count_mismatch_is_an_error():
    q, k, v = qkv(20, 20, 2)
    with pytest.raises(MethodError, match="lists 2 heads for a layer with H = 4"):
        per_head_attention(q, k, v, [AS, AS], None, None)
