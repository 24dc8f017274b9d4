"""Peak memory and time of the blockwise position remaps at long lengths on CPU, against torch SDPA.

Each method runs in a fresh subprocess on one head-set (B = 1, H = H_kv = 1, D = 64, fp32, T = S = length):
the peak resident memory it adds (``ru_maxrss`` after the call minus before it, inputs already allocated) and
the median wall time of ``--repeats`` calls (every call timed, no separate warm-up), once with the parts
PyTorch's fused CPU kernel can run sent there (``auto``, what inference uses) and once all blockwise (what a
call with gradients uses). The baseline is plain causal ``scaled_dot_product_attention`` measured the same way
in the same run; ratios are against it. A dense (T, T) fp32 score matrix per head would
take ``4 · T² · H`` bytes, listed for comparison. Each run is appended to ``results/remap_memory.json``.

    .venv/bin/python benchmarks/rope/remap_memory.py --length 16384 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

B, H, H_KV, D = 1, 1, 1, 64
BLOCK = 512


def _methods() -> dict:
    from longkit.registry import registry

    kw = {"block_q": BLOCK, "block_k": BLOCK}
    # settings for a model trained at 8K (smollm2-135m), as the method defaults pick them
    args = {
        "self_extend": {"group_size": 8, "window": 512},
        "rerope": {"window": 512},
        "leaky_rerope": {"window": 512, "leak": 16.0},
        "dca": {"chunk_size": 6144, "local_window": 512},
        "lm_infinite": {"window": 8192, "n_sinks": 100},
    }
    return {name: registry("attention").create(name, {**a, **kw}) for name, a in args.items()}


TRAINED = 8192


def _rss_mib() -> float:
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(name: str, length: int, repeats: int, kernel: str) -> dict:
    import torch

    torch.manual_seed(0)
    q = torch.randn(B, H, length, D)
    k, v = torch.randn(B, H_KV, length, D), torch.randn(B, H_KV, length, D)
    inv_freq = 1.0 / (100000 ** (torch.arange(0, D, 2).float() / D))
    if name == "sdpa":
        kr, vr = k.repeat_interleave(H // H_KV, 1), v.repeat_interleave(H // H_KV, 1)

        def fn():
            return torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True)
    else:
        method = _methods()[name]
        # "auto": the parts PyTorch's fused CPU kernel can run go there (what inference uses); "blockwise": the
        # blockwise primitive everywhere (what training, with gradients, uses)
        method.fused_cpu = kernel == "auto"

        def fn():
            # the method's own call with the model's rotated q, k (trained length 8K), as inference makes it
            return method.attend(q, k, v, inv_freq, TRAINED, dense=None, scale=None, **method.tiles())

    before = _rss_mib()
    times = []
    with torch.no_grad():
        # every call is timed; the peak is the high-water mark over all of them (the first sets it)
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    peak = _rss_mib() - before
    return {
        "method": name,
        "kernel": kernel,
        "length": length,
        "peak_added_mib": round(peak, 1),
        "median_s": round(statistics.median(times), 3),
        "repeats": repeats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--methods", default="sdpa,self_extend,rerope,leaky_rerope,dca,lm_infinite")
    parser.add_argument("--kernels", default="auto,blockwise", help="auto (fused CPU kernel where possible), blockwise")
    parser.add_argument("--kernel", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.length, args.repeats, args.kernel)))
        return
    rows = []
    for name in args.methods.split(","):
        # sdpa has no kernel choice: measured once
        for kernel in ["auto"] if name == "sdpa" else args.kernels.split(","):
            cmd = [sys.executable, __file__, "--one", name, "--kernel", kernel]
            cmd += ["--length", str(args.length), "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    base = next((r for r in rows if r["method"] == "sdpa"), None)
    for r in rows:
        if base:
            r["time_vs_sdpa"] = round(r["median_s"] / base["median_s"], 2)
    dense_mib = 4 * args.length**2 * H / 2**20
    result = {
        "shape": {"B": B, "H": H, "H_kv": H_KV, "D": D, "T": args.length, "S": args.length},
        "block": BLOCK,
        "dense_scores_fp32_mib": round(dense_mib, 1),
        "rows": rows,
    }
    path = Path(__file__).parent / "results" / "remap_memory.json"
    history = json.loads(path.read_text()) if path.exists() else []
    history.append(result)
    path.write_text(json.dumps(history, indent=1) + "\n")
    print(
        f"| method | kernel | T | peak added (MiB) | median s | time / sdpa |  (dense fp32 scores: {dense_mib:.0f} MiB)"
    )
    for r in rows:
        cells = [r["method"], r["kernel"], r["length"], r["peak_added_mib"], r["median_s"], r.get("time_vs_sdpa", "")]
        print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
