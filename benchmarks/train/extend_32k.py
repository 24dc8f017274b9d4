"""The training room's headline experiment: extend SmolLM2-135M from its 8K window to 32K on this CPU, then compare
the trained model with the base model and the best training-free methods on the same prompts.

    python benchmarks/train/extend_32k.py train          # <= 60 min on 2 cores: PoSE + YaRN x4, LoRA
    python benchmarks/train/extend_32k.py train --run 2  # the second run: code, books and key-value retrieval
    python benchmarks/train/extend_32k.py train --run 3  # the third: 4,096-token windows, code + key-value retrieval
    python benchmarks/train/extend_32k.py eval --buckets short,16k,32k [--only trained,base]
    python benchmarks/train/extend_32k.py render         # table.md + results.json from the committed records

Training (``longkit train``): PoSE (Zhu et al. 2024) on 2,048-token windows whose position ids span 32,768, with
YaRN x4 trained in (its ``rope_parameters`` land in the saved config.json), LoRA r=16 on q/k/v/o, on the standard
library's code only (``--data python-stdlib``): Python's documentation topics are the evaluation's haystack and
perplexity text, so they are held out of training. The second run (``--run 2``, rows ``trained2``) is the same
recipe on a mixture: code 50%, synthetic key-value retrieval chats 30% (Xiong et al. 2024, loss on the answers
only), the King James Bible 10% and Jane Austen's novels 10% (Debian's bible-kjv-text / r-cran-janeaustenr, or
``LONGKIT_BOOKS_ROOT``), with a held-out retrieval loss every 50 steps. The third (``--run 3``, rows ``trained3``)
tests what the second run's flat held-out loss suggested: PoSE windows of 4,096 tokens (a retrieval span longer
than 2K), code 60% and key-value retrieval 40% (no books: they cost short-context perplexity), 96 steps (the same
hour: a 4K step costs about twice a 2K step).

Evaluation (``longkit eval``, seed 0, so both models see the same prompts; the renderer checks the answers match):
passkey and needle at depths 0.1/0.3/0.5/0.7/0.9 (5 samples per length), RULER niah_single_2 (5 samples per
length), perplexity on the held-out documentation topics; lengths in buckets (short = 2K/4K/8K, then 16K, then
32K) so that an interrupted or partial evaluation still gives whole lengths for every model. The comparison
models: the base model, NTK x4, YaRN x4 (the same scaling, not trained) and Self-Extend (window 2048, group 5:
(8192 - 2048) x 5 + 2048 = 32K). Every run directory resumes: rerun the same command after an interruption.
Effective length: RULER's rule (the longest length whose score is above 85) on the mean of passkey, needle and
niah_single_2 per length.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

import evalgrid  # noqa: E402  (benchmarks/evalgrid.py, on the path above)

RESULTS = HERE / "results" / "extend_32k"
LONGKIT = evalgrid.LONGKIT

TRAIN_OUT = "/work/runs/pose-yarn4-32k"
TRAIN_ARGS = ["train", "pose:window=2048,lora=true,lora_r=16,lr=1e-4,warmup_ratio=0.05", "--model", "smollm2-135m",
              "--data", "python-stdlib", "--target-length", "32k", "--rope", "yarn:factor=4", "--steps", "300",
              "--save-every", "25"]
TRAIN2_OUT = "/work/runs/pose-yarn4-32k-kv2"
TRAIN2_ARGS = ["train", "pose:window=2048,lora=true,lora_r=16,lr=1e-4,warmup_ratio=0.05", "--model", "smollm2-135m",
               "--data", "python-stdlib:share=0.5", "--data", "kv-retrieval:share=0.3", "--data", "kjv:share=0.1",
               "--data", "austen:share=0.1", "--target-length", "32k", "--rope", "yarn:factor=4", "--steps", "300",
               "--save-every", "25", "--eval-every", "50", "--eval-data", "kv-retrieval:seed=1,count=16",
               "--eval-rows", "8"]
TRAIN3_OUT = "/work/runs/pose4k-yarn4-32k-kv3"
TRAIN3_ARGS = ["train", "pose:window=4096,lora=true,lora_r=16,lr=1e-4,warmup_ratio=0.05", "--model", "smollm2-135m",
               "--data", "python-stdlib:share=0.6", "--data", "kv-retrieval:share=0.4", "--target-length", "32k",
               "--rope", "yarn:factor=4", "--steps", "96", "--save-every", "12", "--eval-every", "24",
               "--eval-data", "kv-retrieval:seed=1,count=16", "--eval-rows", "8"]
#: The training runs: (command, default output directory, where its report and log are copied under RESULTS).
RUNS = {"1": (TRAIN_ARGS, TRAIN_OUT, "."), "2": (TRAIN2_ARGS, TRAIN2_OUT, "trained2"),
        "3": (TRAIN3_ARGS, TRAIN3_OUT, "trained3")}
FILES = ("train_report.json", "train_log.jsonl", "data_stats.json", "loss.png", "train_run.json")

#: Comparison methods on the base model (the runner adds the untouched model as "baseline").
BASE_METHODS = ["--rope", "ntk:factor=4", "--rope", "yarn:factor=4",
                "--attention", "self_extend:group_size=5,window=2048"]
BUCKETS = {"short": "2k,4k,8k", "16k": "16k", "32k": "32k"}
DEPTHS = "0.1,0.3,0.5,0.7,0.9"
#: (group name, eval arguments): passkey/needle over 5 depths x 1 sample, perplexity 1 window per length;
#: RULER's niah_single_2 5 samples per length (RULER tasks draw their own depths).
GROUPS = {
    "depth": ["--task", "passkey", "--task", "needle", "--task", "perplexity", "--depths", DEPTHS, "--samples", "1"],
    "ruler": ["--task", "niah_single_2", "--samples", "5"],
}
TASKS = ("passkey", "needle", "niah_single_2")
#: This table's threshold of RULER's rule (the grids of later rooms use RULER's own 85.6).
THRESHOLD = 85.0
LABELS = {
    "trained:baseline": "trained (PoSE + YaRN x4, LoRA)",
    "trained2:baseline": "trained 2 (as 1, on code + books + key-value retrieval)",
    "trained3:baseline": "trained 3 (4K windows, code + key-value retrieval)",
    "base:baseline": "base model",
    "base:rope=ntk:factor=4": "NTK x4",
    "base:rope=yarn:factor=4": "YaRN x4 (not trained)",
    "base:attention=self_extend:group_size=5,window=2048": "Self-Extend (G=5, w=2048)",
}


def run_dir(model: str, bucket: str, group: str) -> Path:
    return evalgrid.run_dir(RESULTS, model, bucket, group)


def train(args: argparse.Namespace) -> None:
    train_args, default_out, where = RUNS[args.run]
    out = args.out or default_out
    cmd = [LONGKIT, *train_args, "--out", out]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    copy_run(out, where)


def copy_run(out: str, where: str) -> None:
    """The run's report, log, data statistics and loss curve beside the records (``where`` under RESULTS)."""
    dest = RESULTS / where
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copy(Path(out) / name, dest / name)


def steps(args: argparse.Namespace) -> list[evalgrid.Step]:
    models = {"trained": [args.out, "--no-default-methods"], "trained2": [args.out2, "--no-default-methods"],
              "trained3": [args.out3, "--no-default-methods"],
              "base": ["smollm2-135m", *BASE_METHODS]}
    only = evalgrid.names(args.only, models, "model")
    return [evalgrid.Step(d, evalgrid.eval_command(models[model], extra, BUCKETS[bucket], d), None)
            for bucket in evalgrid.names(args.buckets, BUCKETS, "bucket") for model in only
            for group, extra in GROUPS.items() for d in [run_dir(model, bucket, group)]]


def evaluate(args: argparse.Namespace) -> None:
    evalgrid.run_steps(steps(args))


# ----------------------------------------------------------------------------------------------------- render


def load() -> tuple[list[dict], list[dict]]:
    """(sample records tagged with their model and table row, run.json configs)."""
    def tag(name: str) -> dict:
        return {"model": name.split("-")[0]}

    rows, _, configs = evalgrid.load(RESULTS, tag)
    return [{**r, "row": f"{r['model']}:{r['method']}"} for r in rows], configs


def summarize(rows: list[dict]) -> dict:
    # RULER's rule on the mean over the three retrieval tasks, at lengths where all three were measured.
    full = evalgrid.summarize(rows, lambda n: TASKS, THRESHOLD)
    return {k: {f: m[f] for f in ("scores", "n", "ppl", "prefill_s", "mean", "effective")} for k, m in full.items()}


def table() -> tuple[str, dict]:
    """The markdown table and the per-model summary, from the records only (nothing measured, nothing written)."""
    rows, configs = load()
    # The trained and the base model differ by design; the prompts' other settings must not.
    prompts = evalgrid.check_same_prompts(rows, configs)
    summary = summarize(rows)
    lengths = sorted({int(r["length"]) for r in rows})
    keys = [k for k in LABELS if k in summary]
    k_, fmt = evalgrid.k, evalgrid.fmt
    lines = ["# Extending SmolLM2-135M from 8K to 32K on a 2-core CPU: trained vs training-free", "",
             f"`python {Path(__file__).relative_to(REPO)} render` (records in `{RESULTS.relative_to(REPO)}/`); "
             f"{prompts} prompts; every model measured at a length was asked the same ones (checked: same answers).", ""]
    for number, (_, _, where) in RUNS.items():
        report = RESULTS / where / "train_report.json"
        if not report.is_file():
            continue
        t = json.loads(report.read_text())
        name = "Training" if number == "1" else f"Training {number}"
        sources = t["data"]["sources"]
        total = sum(v.get("sampled_tokens", 0) for v in sources.values()) or 1
        data = ", ".join(f"{src} {v.get('sampled_tokens', 0) / total:.0%}" for src, v in sources.items())
        held = (f"; held-out loss {t['first_eval_loss']:.3f} -> {t['final_eval_loss']:.3f}"
                if t.get("final_eval_loss") is not None else "")
        lines += [f"{name}: `{t['recipe']}`, rope `{t['rope']}`, target {t['target_length']}, {t['steps']} steps, "
                  f"{t['tokens_seen']:,} tokens, {t['seconds_this_session'] / 60:.1f} min "
                  f"({t['tokens_per_second']:.0f} tokens/s), loss {t['first_loss']:.3f} -> {t['final_loss']:.3f}"
                  f"{held}; data: {data}; loss curve: [loss.png]({Path(where, 'loss.png').as_posix()}).", ""]
    for n in lengths:
        lines += [f"**{k_(n)} tokens**", "", "| model | passkey | needle | niah_single_2 | mean | ppl | prefill s (median) |",
                  "|---|---|---|---|---|---|---|"]
        for k in keys:
            m = summary[k]
            if not any(n in m["scores"].get(t, {}) for t in TASKS) and n not in m["ppl"]:
                continue
            lines.append(evalgrid.row([LABELS[k], *[fmt(m["scores"].get(t, {}).get(n), ".0f") for t in TASKS],
                                       fmt(m["mean"].get(n), ".0f"), fmt(m["ppl"].get(n), ".2f"),
                                       fmt(m["prefill_s"].get(n), ".1f")]))
        lines.append("")
    lines += ["**Effective length** (RULER's rule, score > 85, on the mean of the three tasks; lengths measured)", "",
              "| model | lengths measured | effective length |", "|---|---|---|"]
    for k in keys:
        m = summary[k]
        lines.append(f"| {LABELS[k]} | {', '.join(k_(n) for n in sorted(m['mean']))} | "
                     f"{k_(m['effective']) if m['effective'] else 'none'} |")
    counts = sorted({c for k in keys for by in summary[k]["n"].values() for c in by.values()})
    lines += ["", f"Scores: % correct (passkey, needle: 5 depths x 1 sample; niah_single_2: 5 samples); samples per "
              f"cell: {', '.join(map(str, counts))}. `-` = not measured yet. Perplexity: the held-out documentation "
              "topics, one window per length (its second half scored). Effective length: RULER's rule (score > 85) "
              "on the mean of the three tasks."]
    return "\n".join(lines) + "\n", {k: summary[k] for k in keys}


def render(_: argparse.Namespace | None = None) -> None:
    text, summary = table()
    evalgrid.write(RESULTS, text, summary)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--run", choices=sorted(RUNS), default="1", help="which training run (1: code only; 2: mixture; 3: 4K windows)")
    t.add_argument("--out", default=None, help="the output directory (default: the run's)")
    e = sub.add_parser("eval")
    e.add_argument("--out", default=TRAIN_OUT, help="the trained model directory (rows 'trained')")
    e.add_argument("--out2", default=TRAIN2_OUT, help="the second trained model directory (rows 'trained2')")
    e.add_argument("--out3", default=TRAIN3_OUT, help="the third trained model directory (rows 'trained3')")
    e.add_argument("--buckets", default="short,16k,32k")
    e.add_argument("--only", default="", help="trained, trained2, trained3, base (default: all)")
    sub.add_parser("render")
    args = ap.parse_args()
    {"train": train, "eval": evaluate, "render": render}[args.cmd](args)


if __name__ == "__main__":
    main()
