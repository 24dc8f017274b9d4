import math

import pytest
import torch

from longkit.errors import EvalError
from longkit.eval.tasks import TASKS, TaskContext, get_task
from longkit.runtime.generate import window_nll


def test_registered_tasks():
    assert {"passkey", "needle", "perplexity"} <= set(TASKS)
    with pytest.raises(EvalError, match="unknown task 'ruler'; valid tasks: .*needle, .*passkey, perplexity"):
        get_task("ruler")


@pytest.mark.parametrize(
    "prediction,score",
    [(" 12345. Remember", 100.0), ("12345", 100.0), (" 1234 5", 0.0), (" is 12345", 100.0), ("none", 0.0),
     (" 012345", 0.0), (" 123456", 0.0), (" 54321 12345", 0.0)],
)
def test_passkey_scores_the_first_integer(prediction, score):
    assert get_task("passkey").score(prediction, ["12345"]) == score


@pytest.mark.parametrize("prediction,score", [(' "7654321".', 100.0), ("x7654321x", 100.0), ("765432", 0.0), ("", 0.0)])
def test_needle_scores_string_match_all(prediction, score):
    assert get_task("needle").score(prediction, ["7654321"]) == score


def test_passkey_prompt_is_the_classic_one(tiny_llama):
    ctx = TaskContext(tiny_llama.tokenizer, seed=3, chat=False)
    s = get_task("passkey").build(ctx, 1500, 0.5, 0)
    text = tiny_llama.tokenizer.decode(s.prompt.input_ids, skip_special_tokens=True)
    key = s.answers[0]
    assert len(key) == 5 and key.isdigit()
    assert text.startswith("There is an important info hidden inside a lot of irrelevant text.")
    assert f"The pass key is {key}. Remember it. {key} is the pass key." in text
    assert "The grass is green. The sky is blue." in text
    assert text.endswith("What is the pass key? The pass key is")
    assert len(s.prompt.input_ids) == 1500


def test_samples_are_deterministic_and_differ_by_index(tiny_llama):
    ctx = TaskContext(tiny_llama.tokenizer, seed=0)
    needle = get_task("needle")
    a, b, c = (needle.build(ctx, 900, 0.5, i) for i in (0, 0, 1))
    assert a.prompt.input_ids == b.prompt.input_ids and a.answers == b.answers
    assert a.answers != c.answers
    other_seed = needle.build(TaskContext(tiny_llama.tokenizer, seed=1), 900, 0.5, 0)
    assert other_seed.answers != a.answers


def test_needle_prompt_in_ruler_format(tiny_llama):
    s = get_task("needle").build(TaskContext(tiny_llama.tokenizer), 2000, 0.3, 0)
    text = tiny_llama.tokenizer.decode(s.prompt.input_ids)
    assert "Some special magic numbers are hidden within the following text." in text
    assert f"is: {s.answers[0]}." in text
    key = text.split("One of the special magic numbers for ")[1].split(" is:")[0]
    assert text.endswith(f"The special magic number for {key} mentioned in the provided text is")


def test_window_nll_matches_the_full_forward_loss(tiny_llama):
    model = tiny_llama.model
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (301,), generator=g).tolist()
    first = 150
    nll, n, _, _ = window_nll(model, ids, first, chunk=64)
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0]
    ref = torch.nn.functional.cross_entropy(logits[first - 1 : -1], torch.tensor(ids[first:]), reduction="sum")
    assert n == 301 - first
    assert math.isclose(nll, float(ref), rel_tol=1e-4)


def test_perplexity_windows_slide_by_half_and_score_the_second_half(tiny_llama, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("abcdefghij" * 100)
    ctx = TaskContext(tiny_llama.tokenizer, ppl_text=str(text))
    task = get_task("perplexity")
    w0, f0 = task.window(ctx, 201, 0)
    w1, f1 = task.window(ctx, 201, 1)
    assert len(w0) == len(w1) == 201 and w0[0] == tiny_llama.tokenizer.bos_token_id
    # body 200 tokens, stride 100: window 1 starts 100 tokens later; last 100 tokens are scored
    assert w1[1:101] == w0[101:201]
    assert f0 == f1 == 101
    with pytest.raises(EvalError, match="the perplexity text has 1000 tokens"):
        task.window(ctx, 201, 10)
    with pytest.raises(EvalError, match="parameter 'ppl_text' must be a text file"):
        task.window(TaskContext(tiny_llama.tokenizer, ppl_text=str(tmp_path / "no.txt")), 201, 0)


def test_chat_template_defaults_per_task_and_can_be_forced(tiny_llama):
    tok = tiny_llama.tokenizer
    im_start = tok.convert_tokens_to_ids("<|im_start|>")

    def uses_template(task, chat):
        return im_start in get_task(task).build(TaskContext(tok, chat=chat), 1500, 0.5, 0).prompt.input_ids

    assert not uses_template("passkey", None) and uses_template("needle", None)
    assert uses_template("passkey", True) and uses_template("needle", True)
    assert not uses_template("passkey", False) and not uses_template("needle", False)
