"""Conformance entries of the KV-cache quantisation room (merged into ``registry_cases.CASES``).

Tiny models have head_dim 16, so group sizes divide 16. The shared decoding test compares cached decoding with
one full forward to 1e-4, so both parameter sets keep the 41 test tokens inside the exact residual; quantisation
itself is checked against a reference in ``test_kvcache_quant.py``. KIVI changes no logits without its cache.
"""

CASES = {
    ("kv", "kivi"): {
        "args": [
            {"bits": 4, "group_size": 8, "residual": 48},
            {"bits": 2, "group_size": 16, "residual": 41, "scale_dtype": "float32"},
        ],
        "changes_logits": False,
    },
}
