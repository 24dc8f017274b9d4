"""The shared conformance matrix: every registered method with an easy and a hard parameter set.

A test fails when a registered method has no entry here, so a new method is listed (and checked) by
construction. Rooms may keep their entries in their own ``tests/cases_<room>.py`` (a module-level ``CASES``
dict of the same shape); every such file is merged in here. ``changes_logits`` says whether the method must change a long prompt's logits on a tiny model.
"""

from __future__ import annotations

HALF = 8  # tiny models: head_dim 16 -> 8 rotary frequencies

CASES: dict[tuple[str, str], dict] = {
    ("rope", "default"): {"args": [{}], "changes_logits": False},
    ("rope", "linear"): {"args": [{"factor": 2.0}, {"factor": 7.5}], "changes_logits": True},
    ("rope", "dynamic"): {"args": [{"factor": 2.0, "original_max_position_embeddings": 32}, {"factor": 4.0, "original_max_position_embeddings": 16}],
                          "changes_logits": True},
    ("rope", "yarn"): {"args": [{"factor": 2.0}, {"factor": 8.0, "beta_fast": 16.0, "beta_slow": 2.0,
                                                  "original_max_position_embeddings": 64}],
                       "changes_logits": True},
    ("rope", "longrope"): {"args": [{"short_factor": [1.0] * HALF, "long_factor": [1.0 + i for i in range(HALF)],
                                     "original_max_position_embeddings": 16},
                                    {"short_factor": [1.5] * HALF, "long_factor": [4.0] * HALF, "factor": 4.0}],
                           "changes_logits": True},
    ("rope", "llama3"): {"args": [{"factor": 8.0, "original_max_position_embeddings": 64},
                                  {"factor": 2.0, "low_freq_factor": 2.0, "high_freq_factor": 3.0,
                                   "original_max_position_embeddings": 32}],
                         "changes_logits": True},
    ("rope", "ntk"): {"args": [{"factor": 2.0}, {"factor": 16.0}], "changes_logits": True},
    ("rope", "abf"): {"args": [{"rope_theta": 500000.0}, {"rope_theta": 2000.0}], "changes_logits": True},
    ("attention", "eager"): {"args": [{}], "changes_logits": False},
    ("attention", "sdpa"): {"args": [{}], "changes_logits": False},
    ("attention", "blockwise"): {"args": [{"block_q": 16, "block_k": 16}, {"block_q": 32, "block_k": 48}],
                                 "changes_logits": False},
    ("attention", "self_extend"): {"args": [{"group_size": 4, "window": 16, "block_q": 16, "block_k": 16},
                                            {"group_size": 3, "window": 7, "block_q": 32, "block_k": 16}],
                                   "changes_logits": True},
    ("attention", "rerope"): {"args": [{"window": 16, "block_q": 16, "block_k": 16},
                                       {"window": 7, "log_n": False, "block_q": 32, "block_k": 16}],
                              "changes_logits": True},
    ("attention", "leaky_rerope"): {"args": [{"window": 16, "leak": 4.0, "block_q": 16, "block_k": 16},
                                             {"window": 7, "leak": 16.0, "block_q": 16, "block_k": 32}],
                                    "changes_logits": True},
}


def _merge_room_cases() -> None:
    import importlib.util
    from pathlib import Path

    for path in sorted(Path(__file__).parent.glob("cases_*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        clash = set(CASES) & set(module.CASES)
        assert not clash, f"{path.name} repeats conformance entries {sorted(clash)}"
        CASES.update(module.CASES)


_merge_room_cases()


def all_cases():
    for (kind, name), case in CASES.items():
        for i, args in enumerate(case["args"]):
            yield kind, name, args, case["changes_logits"], f"{kind}-{name}-{i}"
