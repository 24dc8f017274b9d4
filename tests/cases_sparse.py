"""Conformance entries of the sparse-attention methods (merged into tests/registry_cases.py).

The settings keep every key of the 41-token decoding check (so sparse prefill plus dense decoding equals one
full forward there) while the 97-token prompt of the logits check is sparse. Quest only changes decoding, so a
single forward leaves the logits unchanged.
"""

import json

_VS = {"pattern": "vertical_slash", "vertical_size": 48, "slash_size": 4, "sinks": 1, "local": 2, "block": 16}
_AS = {"pattern": "a_shape", "sinks": 2, "window": 44, "block_q": 16}
_BS = {"pattern": "block_sparse", "block_size": 16, "top_k": 3}

CASES = {
    ("attention", "a_shape"): {
        "args": [{"sinks": 4, "window": 48, "block_q": 16}, {"sinks": 0, "window": 41, "block_q": 32}],
        "changes_logits": True,
    },
    ("attention", "vertical_slash"): {
        "args": [
            {"vertical_size": 48, "slash_size": 8, "last_q": 16, "sinks": 2, "local": 4, "block": 16},
            {"vertical_size": 8, "slash_size": 41, "sinks": 1, "local": 2, "block": 32},
        ],
        "changes_logits": True,
    },
    ("attention", "block_sparse"): {
        "args": [{"block_size": 16, "top_k": 3}, {"block_size": 24, "top_k": 2}],
        "changes_logits": True,
    },
    ("attention", "moba"): {
        "args": [{"block_size": 16, "top_k": 3, "block_q": 16}, {"block_size": 32, "top_k": 2, "block_q": 16}],
        "changes_logits": True,
    },
    ("attention", "quest"): {
        "args": [{"page_size": 16, "top_k": 3, "skip_layers": 0}, {"page_size": 8, "top_k": 6, "skip_layers": 1}],
        "changes_logits": False,
    },
    ("attention", "minference"): {
        "args": [
            {"config": json.dumps({"0": [_VS, _AS, _BS, {"pattern": "dense"}]}), "default": "a_shape"},
            {"config": json.dumps({"0": [_BS, _BS, _VS, _VS], "1": [_AS, _VS, _AS, _BS]}), "default": "dense"},
        ],
        "changes_logits": True,
    },
}
