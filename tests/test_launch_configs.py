"""Every launch configuration the launchers can choose, run once against the reference.

The compile gate (``python -m fastppo.kernels.compile_check``) compiles the launches the tests
make. The other kernel tests use small shapes, so block sizes that only large inputs choose would
never be compiled: Triton 3.6 crashed on the loss reduction at (512, 8192) alone. Each test here
walks one launcher's choice over the whole range of its input, keeps the smallest input that
reaches each distinct configuration, and runs the op there against its reference.
"""

import pytest
import torch

import fastppo
from fastppo import reference
from fastppo.kernels import gae as gae_kernel
from fastppo.kernels import group_advantages as group_kernel
from fastppo.kernels import masked_reduce
from fastppo.kernels import shape_rewards as shape_rewards_kernel
from fastppo.kernels._common import block_size
from fastppo.kernels.token_logprobs import _launch_config

# Beyond these the choices are constant (every launcher clamps its block sizes).
LONGEST_SEQUENCE = 2**15
LARGEST_VOCABULARY = 2**18


def smallest_input_per_choice(choose, sizes) -> dict:
    """{configuration: the smallest size for which ``choose(size)`` returns it}."""
    found = {}
    for size in sizes:
        found.setdefault(repr(choose(size)), size)
    return found


def leaf(t: torch.Tensor, device) -> torch.Tensor:
    """A fresh leaf on ``device`` (``.to`` alone returns ``t`` itself on its own device, and the
    gradients of two runs would add up in it)."""
    return t.detach().to(device).clone().requires_grad_()


def test_smallest_input_per_choice_keeps_first():
    assert smallest_input_per_choice(lambda n: n // 10, range(1, 25)) == {"0": 1, "1": 10, "2": 20}


# (outputs, gradient) tolerances against the reference, as in test_token_logprobs: outputs are fp32
# (fp64 for fp64); the gradient comes back in the logits' dtype, where the two may round apart.
TOLERANCES = {
    torch.bfloat16: (1e-5, 2e-2),
    torch.float16: (1e-5, 2e-3),
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-12, 1e-12),
}


def vocabularies(dtype) -> list[int]:
    return sorted(
        smallest_input_per_choice(
            lambda V: _launch_config(V, 1, dtype), range(1, LARGEST_VOCABULARY)
        ).values()
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
def test_token_logprobs_every_vocabulary_tile(dtype, device):
    sizes = vocabularies(dtype)
    # tiles from 16 (every V ≤ 16: _common.block_size's floor) to 4096, or 8192 for 16-bit logits
    assert len(sizes) == (10 if dtype.itemsize == 2 else 9), sizes
    g = torch.Generator().manual_seed(0)
    for V in sizes:
        logits = torch.randn(2, V, generator=g).to(dtype)
        labels = torch.tensor([V - 1, 0])
        upstream = torch.randn(2, generator=g), torch.randn(2, generator=g)
        results = []
        for fn in (fastppo.token_logprobs, reference.token_logprobs):
            x = leaf(logits, device)
            logp, entropy = fn(x, labels.to(device), temperature=0.7, return_entropy=True)
            ((logp * upstream[0].to(device)).sum() + (entropy * upstream[1].to(device)).sum()).backward()
            results.append((logp.detach().cpu(), entropy.detach().cpu(), x.grad.cpu().double()))
        (logp, entropy, grad), (ref_logp, ref_entropy, ref_grad) = results
        out_tol, grad_tol = TOLERANCES[dtype]
        torch.testing.assert_close(logp, ref_logp, atol=out_tol, rtol=out_tol)
        torch.testing.assert_close(entropy, ref_entropy, atol=out_tol, rtol=out_tol)
        torch.testing.assert_close(grad, ref_grad, atol=grad_tol, rtol=grad_tol)


@pytest.mark.parametrize("K", [2, 3, 5, 9])
def test_token_logprobs_every_label_block(K, device):
    """Top-K labels: BLOCK_K = K rounded up to a power of two."""
    g = torch.Generator().manual_seed(K)
    logits = torch.randn(3, 300, generator=g)
    labels = torch.randint(0, 300, (3, K), generator=g)
    got = fastppo.token_logprobs(logits.to(device), labels.to(device))
    torch.testing.assert_close(got.cpu(), reference.token_logprobs(logits, labels), atol=1e-5, rtol=1e-5)


def loss_batch(T: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(2, T, generator=g) * 3
    return {
        "logp": logp,
        "old_logp": logp + torch.randn(2, T, generator=g) * 0.3,
        "advantages": torch.randn(2, T, generator=g),
        "mask": torch.rand(2, T, generator=g) < 0.8,
        "ref_logp": logp + torch.randn(2, T, generator=g) * 0.1,
        "entropy": torch.rand(2, T, generator=g) * 2,
        "values": torch.randn(2, T, generator=g),
    }


def token_chunk_sizes() -> list[int]:
    def choose(T):
        layout = masked_reduce.token_layout(torch.Size((2, T)), None)
        return layout.block, layout.parts > 1

    lengths = smallest_input_per_choice(choose, range(1, LONGEST_SEQUENCE))
    return sorted(lengths.values()) + [2 * masked_reduce.MAX_BLOCK + 1]  # several blocks per row


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_losses_every_token_chunk(agg, device):
    for T in token_chunk_sizes():
        b = loss_batch(T, seed=T)
        results = []
        for fn in (fastppo.ppo_policy_loss, reference.ppo_policy_loss):
            logp = leaf(b["logp"], device)
            entropy = leaf(b["entropy"], device)
            loss, stats = fn(
                logp, b["old_logp"].to(device), b["advantages"].to(device), b["mask"].to(device),
                clip_low=0.2, clip_high=0.28, dual_clip=3.0, agg=agg, ref_logp=b["ref_logp"].to(device),
                kl_coef=0.05, entropy=entropy, entropy_coef=0.01,
            )  # fmt: skip
            (1.7 * loss).backward()
            results.append((loss.detach(), stats["clipfrac"], logp.grad, entropy.grad))
        for fn in (fastppo.value_loss, reference.value_loss):
            values = leaf(b["values"], device)
            old = (b["values"] + 0.3).to(device)
            loss, clipfrac = fn(
                values, old, b["advantages"].to(device), b["mask"].to(device), clip=0.2, agg=agg
            )
            loss.backward()
            results.append((loss.detach(), clipfrac, values.grad))
        for got, want in zip(results[0] + results[2], results[1] + results[3], strict=True):
            torch.testing.assert_close(got.cpu(), want.cpu(), atol=1e-5, rtol=1e-5)


def scan_batch(T: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[1, T // 2 :] = False  # rows of different lengths
    return torch.randn(2, T, generator=g), torch.randn(2, T, generator=g), mask


def test_advantages_every_sequence_block(device):
    lengths = smallest_input_per_choice(
        lambda n: block_size(n, gae_kernel.MAX_BLOCK), range(1, LONGEST_SEQUENCE)
    )
    shape_blocks = smallest_input_per_choice(
        lambda n: block_size(n, shape_rewards_kernel.MAX_BLOCK), range(1, 2**13)
    )
    lengths.update({f"shape {k}": v for k, v in shape_blocks.items()})
    for T in sorted(set(lengths.values())):
        rewards, values, mask = scan_batch(T, seed=T)
        scores = torch.randn(2)
        for packed in (False, True):
            layout = fastppo.packing.unpad(mask) if packed else None
            args = (
                (rewards[mask], values[mask], torch.ones(int(mask.sum())))
                if packed
                else (rewards, values, mask)
            )
            extra = {"cu_seqlens": layout.cu_seqlens} if packed else {}
            on = [a.to(device) for a in args]
            extra_on = {k: v.to(device) for k, v in extra.items()}
            got = fastppo.gae(*on, gamma=0.99, lam=0.95, **extra_on)
            want = reference.gae(*args, gamma=0.99, lam=0.95, **extra)
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a.cpu(), b, atol=1e-4, rtol=1e-5)
            got = fastppo.discounted_returns(on[0], on[2], gamma=0.99, **extra_on)
            torch.testing.assert_close(
                got.cpu(), reference.discounted_returns(args[0], args[2], gamma=0.99, **extra)
            )
            got = fastppo.shape_rewards(scores.to(device), on[2], kl=on[1], kl_coef=0.1, **extra_on)
            torch.testing.assert_close(
                got.cpu(), reference.shape_rewards(scores, args[2], kl=args[1], kl_coef=0.1, **extra)
            )


def test_group_advantages_every_group_block(device):
    blocks = smallest_input_per_choice(lambda n: block_size(n, group_kernel.MAX_BLOCK), range(1, 2**12))
    for n in sorted(blocks.values()):
        g = torch.Generator().manual_seed(n)
        scores = torch.rand(2 * n, generator=g)
        group_ids = torch.arange(2 * n) % 2
        for method in ("grpo", "rloo"):
            got = fastppo.group_advantages(scores.to(device), group_ids.to(device), method=method)
            want = reference.group_advantages(scores, group_ids, method=method)
            torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)


def test_masked_whiten_beyond_one_combine_step(device):
    """More partial blocks than the combine reads per step (1024 blocks of 2048 elements)."""
    n = 2048 * 1024 + 5
    g = torch.Generator().manual_seed(0)
    x, mask = torch.randn(n, generator=g), torch.rand(n, generator=g) < 0.5
    got = fastppo.masked_whiten(x.to(device), mask.to(device))
    torch.testing.assert_close(got.cpu(), reference.masked_whiten(x, mask), atol=1e-4, rtol=1e-4)
