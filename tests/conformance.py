"""The shared conformance matrix: every registered method with an easy and a hard parameter set.

``tests/test_conformance.py`` runs every entry through the common checks (apply/remove restores bit-identical
logits, cached decoding matches one full forward, the method changes what it should) and fails when a
registered method has no entry here, so a new method is listed and checked by construction; the rooms' own
matrix checks (``rope/test_rope_frequencies.py``, ``runtime/test_prefill_capture.py``) read the same entries.

An entry: ``args``, the parameter sets; ``changes_logits``, whether the method must change a long prompt's
logits on a tiny model; ``lossy``, set where cached decoding cannot match a full forward (KV eviction).
Tiny models: head_dim 16 (8 rotary frequencies), trained at 512 tokens; the logits check uses a 97-token
prompt and the decoding check 41 tokens.
"""

from __future__ import annotations

import json

HALF = 8  # tiny models: head_dim 16 -> 8 rotary frequencies

# Sparse attention: the settings keep every key of the 41-token decoding check (so sparse prefill plus dense
# decoding equals one full forward there) while the 97-token prompt of the logits check is sparse. Quest only
# changes decoding, so a single forward leaves the logits unchanged.
_VS = {"pattern": "vertical_slash", "vertical_size": 48, "slash_size": 4, "sinks": 1, "local": 2, "block": 16}
_AS = {"pattern": "a_shape", "sinks": 2, "window": 44, "block_q": 16}
_BS = {"pattern": "block_sparse", "block_size": 16, "top_k": 3}

CASES: dict[tuple[str, str], dict] = {
    # ---- rope, and the attention implementations and position remaps ----
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
    # exact: on the tiny Llama models every layer is full attention (plain sdpa); tiny-gemma3's sliding layers take the
    # band path in tests/attention/test_attention_sliding.py and test_attention_hybrid.py
    ("attention", "sliding_window"): {"args": [{}, {"chunk": 16}], "changes_logits": False},
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
    # ---- remaining position remaps and logit scaling: explicit small windows make them change a long prompt ----
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
    # ---- sequence parallel: single-process (no process group) both are exact blockwise attention ----
    ("attention", "ring"): {
        "args": [{"block_q": 16, "block_k": 16}, {"block_q": 32, "block_k": 48}],
        "changes_logits": False,
    },
    ("attention", "ulysses"): {"args": [{}, {"block_q": 16, "block_k": 32}], "changes_logits": False},
    # ---- training-time attention: LongLoRA's S²-Attn applies only in training mode (these checks run in
    # inference mode, where it is full causal attention); tests/attention/test_attention_s2.py checks training ----
    ("attention", "s2_attn"): {"args": [{}, {"group_size_ratio": 0.13}], "changes_logits": False},
    # ---- sparse attention ----
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
    # ---- KV eviction: nothing changes without the compressing cache (changes_logits False); lossy decoding ----
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
    # ---- KV quantisation: group sizes divide 16; both sets keep the 41 test tokens inside the exact residual
    # (quantisation itself is checked against a reference in kvcache/test_kvcache_quant.py) ----
    ("kv", "kivi"): {
        "args": [
            {"bits": 4, "group_size": 8, "residual": 48},
            {"bits": 2, "group_size": 16, "residual": 41, "scale_dtype": "float32"},
        ],
        "changes_logits": False,
    },
    # ---- memory: retrieval rewrites the prompt (eval runner), the model runs unchanged ----
    ("memory", "rag"): {"args": [{}, {"retriever": "dense", "chunk_size": 16, "top_k": 2, "budget": 32}],
                        "changes_logits": False},
    ("memory", "self_route"): {"args": [{}, {"chunk_size": 8, "top_k": 1, "budget": 8}], "changes_logits": False},
    # ---- memory: prompt compression, like retrieval, rewrites the prompt; the compressor is a separate model ----
    ("memory", "longllmlingua"): {
        "args": [{"compressor": "tiny-llama"},
                 {"compressor": "tiny-llama", "ratio": 8.0, "doc_tokens": 16, "iterative_size": 32, "reorder": "original",
                  "condition_compare": False, "dynamic_ratio": 0.0, "context_budget": 0, "device": "cpu"}],
        "changes_logits": False,
    },
    # ---- memory: InfLLM. The 97-token prompt has far tokens (fixed distance) and, with the second set, more blocks
    # than topk (retrieval); the 41-token decoding check stays within topk blocks, where the chunking of prefill
    # and decoding cannot change what is attended, so cached decoding must match one forward ----
    ("memory", "infllm"): {
        "args": [
            {"block_size": 8, "n_init": 4, "n_local": 32, "topk": 2, "repr_topk": 2, "exec_chunk": 16},
            {"block_size": 4, "n_init": 0, "n_local": 24, "topk": 4, "repr_topk": 1, "exec_chunk": 8, "offload": "none"},
        ],
        "changes_logits": True,
    },
    # ---- memory: parallel windows. Like retrieval they lay out the prompt (the eval runner's window loop,
    # tests/memory/test_memory_pcw.py and test_memory_nbce.py); an ordinary forward runs the model unchanged ----
    ("memory", "pcw"): {"args": [{}, {"n_windows": 3}], "changes_logits": False},
    ("memory", "nbce"): {"args": [{}, {"window": 16, "pooling": "mean", "beta": 0.5}], "changes_logits": False},
}


def all_cases():
    for (kind, name), case in CASES.items():
        for i, args in enumerate(case["args"]):
            yield kind, name, args, case["changes_logits"], f"{kind}-{name}-{i}"
