"""Conformance entries of the remaining position remaps and logit-scaling attention methods (merged into
``registry_cases.CASES``). Tiny models are trained at 512 tokens, so explicit small windows make the methods
change a long prompt's logits."""

from __future__ import annotations

CASES: dict[tuple[str, str], dict] = {
    ("attention", "dca"): {
        "args": [
            {"chunk_size": 24, "local_window": 4, "block_q": 16, "block_k": 16},
            {"chunk_size": 9, "local_window": 0, "block_q": 32, "block_k": 16},
        ],
        "changes_logits": True,
    },
    ("attention", "lm_infinite"): {
        "args": [
            {"window": 16, "n_sinks": 4, "block_q": 16, "block_k": 16},
            {"window": 7, "n_sinks": 0, "block_q": 16, "block_k": 32},
        ],
        "changes_logits": True,
    },
    ("attention", "logn"): {
        "args": [{"trained": 8}, {"trained": 3, "inner": "blockwise", "block_q": 16, "block_k": 16}],
        "changes_logits": True,
    },
    ("attention", "entropy_scaling"): {
        "args": [
            {"trained": 8, "skip_layers": 1},
            {"trained": 4, "skip_layers": 0, "inner": "blockwise", "block_q": 16, "block_k": 32},
        ],
        "changes_logits": True,
    },
}
