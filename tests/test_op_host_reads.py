"""The ops the trainer calls per micro-batch make no device-to-host read, forward and backward, on
packed input (Triton path; the interpreter runs it on CPU tensors). Reads are counted as in
``test_host_reads.py``: any call of ``READS`` on a tensor made from fastppo's code. Value checks
of ``cu_seqlens`` and labels go through ``torch._assert_async`` (a synchronous raise on CPU,
asynchronous on CUDA), so bad values still fail with one clear line."""

import pytest
import torch
from test_host_reads import counted_reads

import fastppo
from fastppo.reference import RolloutCorrection

LENGTHS = (5, 0, 37, 1, 20)  # an empty sequence, one token, one longer than a 32-token block


def packed_batch(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(LENGTHS)
    logp = -torch.rand(n, generator=g) * 3
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    batch = dict(
        logp=logp,
        old_logp=logp + torch.randn(n, generator=g) * 0.3,
        advantages=torch.randn(n, generator=g),
        mask=torch.rand(n, generator=g) < 0.8,
        rollout_logp=logp + torch.randn(n, generator=g) * 0.2,
        ref_logp=logp + torch.randn(n, generator=g) * 0.2,
        entropy=torch.rand(n, generator=g),
    )
    return {k: v.to(device) for k, v in batch.items()}, cu.to(device)


def assert_no_reads(reads):
    assert not reads, f"host reads from fastppo's code: {dict(reads)}"


@pytest.mark.parametrize(
    "options",
    [
        dict(agg="token-mean"),
        dict(
            agg="seq-mean-token-mean",
            ratio_level="sequence",
            rollout_correction=RolloutCorrection("sequence"),
        ),
        dict(
            agg="seq-mean-token-sum",
            loss="geo_mean",
            rollout_correction=RolloutCorrection("geometric", "mask"),
        ),
    ],
    ids=["token", "gspo-seq-rollout", "gmpo-geometric"],
)
def test_ppo_policy_loss_reads_nothing(device, options):
    b, cu = packed_batch(device)
    logp = b["logp"].clone().requires_grad_()
    entropy = b["entropy"].clone().requires_grad_()
    rollout = b["rollout_logp"] if "rollout_correction" in options else None
    with counted_reads() as reads:
        loss, stats = fastppo.ppo_policy_loss(
            logp, b["old_logp"], b["advantages"], b["mask"], ref_logp=b["ref_logp"], kl_coef=0.1,
            entropy=entropy, entropy_coef=0.01, rollout_logp=rollout, cu_seqlens=cu, **options,
        )  # fmt: skip
        loss.backward()
    assert_no_reads(reads)
    assert torch.isfinite(loss) and logp.grad.shape == logp.shape and entropy.grad is not None


def test_value_loss_reads_nothing(device):
    b, cu = packed_batch(device)
    values = b["logp"].clone().requires_grad_()
    with counted_reads() as reads:
        loss, clipfrac = fastppo.value_loss(
            values, b["old_logp"], b["advantages"], b["mask"], agg="seq-mean-token-mean", cu_seqlens=cu
        )
        loss.backward()
    assert_no_reads(reads)
    assert torch.isfinite(loss) and values.grad.shape == values.shape


def test_kl_penalty_reads_nothing(device):
    b, _ = packed_batch(device)
    logp = b["logp"].clone().requires_grad_()
    with counted_reads() as reads:
        kl = fastppo.kl_penalty(logp, b["ref_logp"], "k3")
        kl.sum().backward()
    assert_no_reads(reads)
    assert kl.shape == logp.shape and logp.grad.shape == logp.shape


def labels_with_ignored(n, V, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (n,), generator=g)
    labels[::3] = -100
    return labels.to(device)


def test_token_logprobs_reads_nothing(device):
    n, V = sum(LENGTHS), 50
    logits = torch.randn(n, V, generator=torch.Generator().manual_seed(1)).to(device).requires_grad_()
    labels = labels_with_ignored(n, V, device)
    with counted_reads() as reads:
        logp, entropy = fastppo.token_logprobs(logits, labels, temperature=0.7, return_entropy=True)
        (logp.sum() + entropy.sum()).backward()
    assert_no_reads(reads)
    assert logp.shape == (n,) and torch.all(logp[::3] == 0) and logits.grad.shape == logits.shape


def test_linear_logprobs_reads_nothing(device):
    n, V, H = sum(LENGTHS), 50, 16
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(n, H, generator=g).to(device).requires_grad_()
    weight = torch.randn(V, H, generator=g).to(device).requires_grad_()
    labels = labels_with_ignored(n, V, device)
    with counted_reads() as reads:
        logp, entropy = fastppo.linear_logprobs(hidden, weight, labels, return_entropy=True, chunk_size=16)
        (logp.sum() + entropy.sum()).backward()
    assert_no_reads(reads)
    assert torch.all(logp[::3] == 0) and torch.all(hidden.grad[::3] == 0) and weight.grad is not None


@pytest.mark.parametrize(
    "cu, match",
    [
        ([0, 3, 2, 10], "cu_seqlens must start at 0, never decrease and end at the number of tokens"),
        ([1, 10], "cu_seqlens must start at 0, never decrease and end at the number of tokens"),
        ([0, 9], "cu_seqlens must start at 0, never decrease and end at the number of tokens"),
    ],
)
def test_bad_cu_seqlens_values_raise_without_a_read(cu, match):
    """On CPU: ``torch._assert_async`` raises at once there (on CUDA its device-side assert is
    fatal to the process)."""
    x = torch.zeros(10)
    cu = torch.tensor(cu, dtype=torch.int32)
    for call in (
        lambda: fastppo.ppo_policy_loss(x, x, x, x, cu_seqlens=cu),
        lambda: fastppo.value_loss(x, x, x, x, cu_seqlens=cu),
    ):
        with counted_reads() as reads, pytest.raises(RuntimeError, match=match):
            call()
        assert_no_reads(reads)


def test_bad_labels_raise_without_a_read():
    labels = torch.tensor([0, 3, 50, -100])
    logits = torch.zeros(4, 50)
    with counted_reads() as reads, pytest.raises(RuntimeError, match=r"labels must lie in \[0, 50\)"):
        fastppo.token_logprobs(logits, labels)
    with counted_reads() as more, pytest.raises(RuntimeError, match=r"labels must lie in \[0, 50\)"):
        fastppo.linear_logprobs(torch.zeros(4, 8), torch.zeros(50, 8), labels)
    assert_no_reads(reads + more)


def test_reference_path_reads_nothing_on_packed_input(monkeypatch):
    """The CPU path (FASTPPO_BACKEND=torch: the references) sums packed sequences with index_add,
    so it reads nothing either."""
    monkeypatch.setenv("FASTPPO_BACKEND", "torch")
    b, cu = packed_batch("cpu")
    logp = b["logp"].clone().requires_grad_()
    options = dict(ratio_level="sequence", rollout_correction=RolloutCorrection("sequence"))
    with counted_reads() as reads:
        loss, _ = fastppo.ppo_policy_loss(
            logp, b["old_logp"], b["advantages"], b["mask"], rollout_logp=b["rollout_logp"],
            agg="seq-mean-token-mean", cu_seqlens=cu, **options,
        )  # fmt: skip
        value, _ = fastppo.value_loss(
            logp, b["old_logp"], b["advantages"], b["mask"], agg="seq-mean-token-sum", cu_seqlens=cu
        )
        (loss + value).backward()
    assert_no_reads(reads)
    assert torch.isfinite(loss) and torch.isfinite(value) and torch.isfinite(logp.grad).all()
