"""Conformance entries for the sequence-parallel attention methods (ring, ulysses).

Applied single-process (no process group), both are exact blockwise attention, so logits must not change.
"""

CASES = {
    ("attention", "ring"): {
        "args": [{"block_q": 16, "block_k": 16}, {"block_q": 32, "block_k": 48}],
        "changes_logits": False,
    },
    ("attention", "ulysses"): {"args": [{}, {"block_q": 16, "block_k": 32}], "changes_logits": False},
}
