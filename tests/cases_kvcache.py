"""Conformance entries of the KV-cache eviction methods (merged into registry_cases.CASES).

KV methods change nothing without their compressing cache, so a plain forward keeps its logits
(``changes_logits`` False); evicting is lossy, so cached decoding cannot match one full forward (``lossy``).
"""

CASES = {
    ("kv", "snapkv"): {
        "args": [{"ratio": 0.5}, {"tokens": 9, "window": 4, "kernel": 3, "pooling": "max"}],
        "changes_logits": False,
        "lossy": True,
    },
    ("kv", "pyramidkv"): {
        "args": [{"ratio": 0.5}, {"ratio": 0.2, "window": 4, "beta": 2.0}],
        "changes_logits": False,
        "lossy": True,
    },
    ("kv", "adakv"): {
        "args": [
            {"ratio": 0.5},
            {"ratio": 0.2, "scorer": "knorm", "alpha": 0.0},
            {"ratio": 0.3, "scorer": "snapkv", "scorer_args": "window=4;kernel=3"},
        ],
        "changes_logits": False,
        "lossy": True,
    },
    ("kv", "knorm"): {
        "args": [{"ratio": 0.5}, {"tokens": 7, "decode_every": 2}],
        "changes_logits": False,
        "lossy": True,
    },
    ("kv", "expected_attention"): {
        "args": [
            {"ratio": 0.5},
            {"tokens": 9, "n_sink": 2, "n_future_positions": 7, "epsilon": 0.01, "decode_every": 3},
        ],
        "changes_logits": False,
        "lossy": True,
    },
    ("kv", "tova"): {"args": [{"ratio": 0.5}, {"tokens": 11}], "changes_logits": False, "lossy": True},
    ("kv", "h2o"): {
        "args": [{"ratio": 0.5}, {"tokens": 12, "recent": 0.25, "decode_every": 2}],
        "changes_logits": False,
        "lossy": True,
    },
    ("kv", "scissorhands"): {
        "args": [{"ratio": 0.5}, {"tokens": 12, "history": 5, "recent": 0.5}],
        "changes_logits": False,
        "lossy": True,
    },
    ("kv", "cam"): {
        "args": [{"ratio": 0.5}, {"tokens": 9, "window": 4, "kernel": 1, "merge": 3, "mode": "expected"}],
        "changes_logits": False,
        "lossy": True,
    },
    ("kv", "random"): {"args": [{"ratio": 0.5}, {"ratio": 0.1, "seed": 3}], "changes_logits": False, "lossy": True},
    ("kv", "duo_attention"): {
        "args": [
            {"retrieval_ratio": 0.25},
            {"retrieval_ratio": 0.5, "sinks": 2, "window": 8, "probe_tokens": 64, "probes": 2, "needle": 4},
        ],
        "changes_logits": False,
        "lossy": True,
    },
    ("kv", "streaming_llm"): {
        "args": [{"ratio": 0.5}, {"tokens": 10, "sink": 2}],
        "changes_logits": False,
        "lossy": True,
    },
}
