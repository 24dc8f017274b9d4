"""Cross-entropy and LongCE against hand computations; the short-context losses against one forward per target."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import sample_ids
from longkit.errors import MethodError
from longkit.train.losses import cross_entropy, longce_loss, longce_weights, short_context_nll, token_nll


def _logits(B=2, T=6, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, V, generator=g), torch.randint(0, V, (B, T), generator=g)


def test_token_nll_and_cross_entropy_by_hand():
    logits, labels = _logits()
    labels[1, 3] = -100
    nll = token_nll(logits, labels)
    assert nll.shape == (2, 5)
    for b in range(2):
        for t in range(5):
            target = int(labels[b, t + 1])
            expected = 0.0 if target == -100 else -math.log(float(torch.softmax(logits[b, t].double(), -1)[target]))
            assert float(nll[b, t]) == pytest.approx(expected, abs=1e-5)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(cross_entropy(logits, labels), ref)


def test_longce_weights_by_hand():
    long = torch.tensor([1.0, 2.0, 0.5, 3.0])
    short = torch.tensor([3.0, 2.5, 0.1, float("nan")])
    w = longce_weights(long, short)
    # exp(2) = 7.39 capped at 5; exp(0.5); exp(-0.4); no short window -> 1
    torch.testing.assert_close(w, torch.tensor([5.0, math.exp(0.5), math.exp(-0.4), 1.0]))
    torch.testing.assert_close(longce_weights(long, short, cap=2.0)[:2], torch.tensor([2.0, 1.6487213]))


def test_longce_loss_by_hand_and_no_gradient_through_the_weights():
    logits, labels = _logits(B=1, T=5, V=7)
    logits.requires_grad_()
    short = torch.tensor([[float("nan"), 0.3, 4.0, 2.0]])
    loss = longce_loss(logits, labels, short)
    logp = torch.log_softmax(logits.detach()[0, :-1], -1)
    nll = [-float(logp[t, int(labels[0, t + 1])]) for t in range(4)]
    w = [1.0] + [min(math.exp(float(short[0, t]) - nll[t]), 5.0) for t in range(1, 4)]
    assert float(loss.detach()) == pytest.approx(sum(a * b for a, b in zip(nll, w, strict=True)) / 4, rel=1e-6)
    loss.backward()
    # The weighted CE's gradient with the weights held constant (the reference computes them under no_grad).
    x = logits.detach().clone().requires_grad_()
    (torch.stack([-torch.log_softmax(x[0, t], -1)[int(labels[0, t + 1])] for t in range(4)]) * torch.tensor(w)).mean().backward()
    torch.testing.assert_close(logits.grad, x.grad)


def test_longce_with_ignored_targets_averages_over_the_scored_ones():
    logits, labels = _logits(B=1, T=5, V=7)
    labels[0, 2] = -100
    short = torch.full((1, 4), float("nan"))
    torch.testing.assert_close(longce_loss(logits, labels, short), cross_entropy(logits, labels))


def test_short_context_nll_is_one_truncated_forward_per_target(tiny_llama):
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=20)
    trunc, stride = 8, 5
    with torch.no_grad():
        got = short_context_nll(model, ids, trunc_len=trunc, stride=stride)
        assert got.shape == (1, 19)
        assert torch.isnan(got[0, : trunc - 1]).all()
        for t in range(trunc, 20):
            # target t shares the window that starts at the last multiple of stride at most t - trunc
            a = (t - trunc) // stride * stride
            logits = model(ids[:, a:t]).logits[0, -1].float()
            expected = -torch.log_softmax(logits, -1)[ids[0, t]]
            assert float(got[0, t - 1]) == pytest.approx(float(expected), abs=1e-5), t
        # a sequence no longer than the short window has no short estimate: every weight is 1
        assert torch.isnan(short_context_nll(model, ids[:, :8], trunc_len=8)).all()
        full = model(ids).logits
    w = longce_weights(token_nll(full, ids), got)
    assert (w[0, : trunc - 1] == 1).all() and not (w[0, trunc - 1 :] == 1).all()


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m, ids: short_context_nll(m, ids, trunc_len=0), "'trunc_len'"),
        (lambda m, ids: short_context_nll(m, ids, stride=1.5), "'stride'"),
        (lambda m, ids: short_context_nll(m, ids.float()), "'input_ids'"),
        (lambda m, ids: longce_weights(torch.ones(3), torch.ones(3), cap=0), "'cap'"),
        (lambda m, ids: longce_weights(torch.ones(3), torch.ones(2)), "'nll_short'"),
        (lambda m, ids: token_nll(torch.ones(1, 3, 4), torch.ones(1, 2, dtype=torch.long)), "'labels'"),
        (lambda m, ids: token_nll(torch.ones(3, 4), torch.ones(3, dtype=torch.long)), "'logits'"),
        (lambda m, ids: cross_entropy(torch.ones(1, 3, 4), torch.full((1, 3), -100)), "ignore_index"),
    ],
)
def test_bad_input(tiny_llama, call, match):
    with pytest.raises(MethodError, match=match):
        call(tiny_llama.model, sample_ids(tiny_llama, n=10))
