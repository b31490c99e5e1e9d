"""fastppo.dpo_loss against the formulas written out in fp64 Python."""

import math

import pytest
import torch

import fastppo


def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def hand(c, r, rc, rr, beta, loss_type, eps):
    losses = []
    for args in zip(c, r, rc, rr, strict=True):
        h = beta * ((args[0] - args[2]) - (args[1] - args[3]))
        if loss_type == "sigmoid":
            losses.append(-(1 - eps) * log_sigmoid(h) - eps * log_sigmoid(-h))
        elif loss_type == "ipo":
            losses.append((h / beta - 1 / (2 * beta)) ** 2)
        else:
            losses.append(max(0.0, 1 - h))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
@pytest.mark.parametrize("beta, eps", [(0.1, 0.0), (0.5, 0.2)])
def test_matches_formulas(loss_type, beta, eps):
    g = torch.Generator().manual_seed(0)
    c, r, rc, rr = (torch.randn(7, generator=g, dtype=torch.float64) * 5 - 20 for _ in range(4))
    chosen = c.clone().requires_grad_()
    options = dict(beta=beta, loss_type=loss_type, label_smoothing=eps)
    loss, chosen_rewards, rejected_rewards = fastppo.dpo_loss(chosen, r, rc, rr, **options)
    assert loss.item() == pytest.approx(
        hand(c.tolist(), r.tolist(), rc.tolist(), rr.tolist(), beta, loss_type, eps)
    )
    torch.testing.assert_close(chosen_rewards, beta * (c - rc))
    torch.testing.assert_close(rejected_rewards, beta * (r - rr))
    assert not chosen_rewards.requires_grad
    loss.backward()
    fn = lambda x: fastppo.dpo_loss(x, r, rc, rr, **options)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (c.clone().requires_grad_(),))


def test_low_precision_inputs_give_fp32():
    x = torch.randn(4, dtype=torch.bfloat16)
    loss, cr, rr = fastppo.dpo_loss(x, x, x, x)
    assert loss.dtype == cr.dtype == rr.dtype == torch.float32
    assert loss.item() == pytest.approx(math.log(2))


def test_bad_input():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="loss_type"):
        fastppo.dpo_loss(x, x, x, x, loss_type="kto")
    with pytest.raises(ValueError, match="beta"):
        fastppo.dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        fastppo.dpo_loss(x, x, x, x, label_smoothing=0.5)
    with pytest.raises(ValueError, match="rejected_logp must have the shape"):
        fastppo.dpo_loss(x, x[:2], x, x)
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        fastppo.dpo_loss(x[None], x[None], x[None], x[None])
