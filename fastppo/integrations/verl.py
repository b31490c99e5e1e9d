"""Drop-in fastppo backend for verl 0.9.1 (``verl.trainer.ppo.core_algos``, ``verl.utils.torch_functional``).

Each function below has the signature of verl's function of the same name and returns what verl
returns (shapes, dtypes, tuple structure, metric keys), computed by fastppo's ops:

==================================  =====================================================
verl                                fastppo
==================================  =====================================================
compute_gae_advantage_return        ``gae(carry_masked=True)`` + ``masked_whiten``
compute_grpo_outcome_advantage      ``group_advantages(method="grpo" | "dr_grpo")``
compute_rloo_outcome_advantage      ``group_advantages(method="rloo")``
kl_penalty                          ``kl_penalty`` (k3 clamped to 10, as verl does)
agg_loss                            ``reference.agg_loss`` (PyTorch) + verl's global-batch scaling
compute_policy_loss_vanilla         ``ppo_policy_loss`` (dual clip = ``clip_ratio_c``)
compute_policy_loss_gspo            ``ppo_policy_loss(ratio_level="sequence")``
compute_policy_loss_cispo           ``ppo_policy_loss(loss="cispo")``
compute_policy_loss_sapo            ``ppo_policy_loss(loss="sapo")``
compute_policy_loss_geo_mean        ``ppo_policy_loss(loss="geo_mean")``
compute_value_loss                  ``value_loss``
logprobs_from_logits                ``token_logprobs``
entropy_from_logits(_with_chunking) ``token_logprobs(return_entropy=True)``
linear_cross_entropy                ``linear_logprobs(return_entropy=True)`` (verl's fused-kernel
                                    path, ``use_fused_kernels``; reduction "none", no vocabulary
                                    split across a process group; else verl's own)
==================================  =====================================================

The policy losses live in ``fastppo.integrations.verl_policy_losses`` (its docstring lists the
ones left to verl: clip_cov, kl_cov, gpg, dro, dppo_tv, dppo_kl).

``patch()`` swaps them into verl: the functions in their modules and in every loaded verl module
that imported them, the ``"vanilla"``/``"gspo"``/``"cispo"``/``"sapo"``/``"geo_mean"`` policy losses and the
``"gae"``/``"grpo"``/``"rloo"`` advantage estimators in verl's registries (each only while it
still holds verl's own function), and it adds the policy losses as ``"fastppo_vanilla"``,
``"fastppo_gspo"``, ``"fastppo_cispo"``, ``"fastppo_sapo"``, ``"fastppo_geo_mean"`` (as
``register()`` does; select one with ``actor.policy_loss.loss_mode=fastppo_gspo``). ``unpatch()``
restores all of it exactly. Outside the tested verl versions (``~=0.9.1``) ``patch()`` warns once
and installs nothing, unless ``patch(force=True)``. Importing this module does not import verl.

An aggregation over an entirely empty mask is NaN, as verl's 0/0 is (fastppo's own ops give 0).
The one deliberate difference: ``actor/ppo_kl`` is the mean of the unclamped
``old_log_prob − log_prob`` (verl's vanilla, cispo and sapo clamp it to ±20 first, which only
matters beyond 20).
"""

import importlib
import os

import torch

import fastppo
from fastppo import reference
from fastppo.integrations._patching import VERL
from fastppo.integrations.verl_policy_losses import (  # noqa: F401  (verl's policy losses live there)
    _CORE,
    POLICY_LOSSES,
    _agg_dtype,
    _float_dtype,
    _global_agg,
    compute_policy_loss_cispo,
    compute_policy_loss_geo_mean,
    compute_policy_loss_gspo,
    compute_policy_loss_sapo,
    compute_policy_loss_vanilla,
)

_TORCH_FUNCTIONAL = "verl.utils.torch_functional"
_LINEAR_CE = "verl.utils.kernel.linear_cross_entropy"
REGISTERED_NAME = "fastppo_vanilla"
#: The names ``register()`` adds to verl's policy-loss registry → the functions' names.
REGISTERED_NAMES = {"fastppo_" + key: name for key, name in POLICY_LOSSES.items()}

# verl's KL estimator names → fastppo's ("full", on whole-vocabulary log-probs, verl does not implement).
_KL_NAMES = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}
_K3_CLAMP = 10.0  # verl bounds low_var_kl / k3 to [-10, 10]


# ---------------------------------------------------------------------------------------------
# Aggregation


def agg_loss(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_agg_mode: str,
    dp_size: int = 1,
    batch_num_tokens=None,
    global_batch_size=None,
    loss_scale_factor=None,
):
    """verl's ``agg_loss``: a per-token loss ``(B, T)`` reduced to a 0-d tensor.

    Modes: token-mean, token-sum, seq-mean-token-sum, seq-mean-token-sum-norm (divided by
    ``loss_scale_factor``, default T), seq-mean-token-mean; rows with no tokens are left out of
    the seq modes. With ``batch_num_tokens`` / ``global_batch_size`` the loss is normalised by
    those global counts and multiplied by ``dp_size`` (both required when ``dp_size > 1``).
    A plain PyTorch reduction (``fastppo.reference.agg_loss``): on its own there is nothing to fuse;
    fastppo's fused losses aggregate inside their kernels. An all-zero mask gives NaN, as verl's does.

    Args:
        loss_mat: ``(B, T)`` per-token loss (gradients flow to it).
        loss_mask: ``(B, T)`` bool/int/float mask (or weights).

    Returns:
        0-d tensor in verl's dtype: ``loss_mat``'s, promoted with a float mask, and at least fp32 in
        the seq modes (verl's row mask is fp32).
    """
    agg, factor = _global_agg(
        loss_agg_mode, loss_mask, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor
    )
    dtype = _agg_dtype(loss_agg_mode, loss_mask, loss_mat)
    if loss_mat.shape != loss_mask.shape:
        raise ValueError(
            f"loss_mask must have the shape of loss_mat {tuple(loss_mat.shape)}, got {tuple(loss_mask.shape)}"
        )
    return (reference.agg_loss(loss_mat.to(dtype), loss_mask, agg) * factor).to(dtype)


# ---------------------------------------------------------------------------------------------
# Losses


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty) -> torch.Tensor:
    """verl's ``kl_penalty``: per-token KL estimate, d = logprob − ref_logprob, by ``fastppo.kl_penalty``.

    Estimators: "kl"/"k1" d; "abs" |d|; "mse"/"k2" d²/2; "low_var_kl"/"k3" exp(−d) + d − 1 clamped
    to [−10, 10] (as verl). A "+" suffix keeps the value and takes the gradient of k2
    (straight-through); "abs+" has no fused form and is built from fastppo's "abs" and "k2".
    "full" raises NotImplementedError, as in verl.

    Args:
        logprob, ref_logprob: broadcastable float tensors (both receive gradients).

    Returns:
        The broadcast shape, in the inputs' promoted dtype.
    """
    if not isinstance(kl_penalty, str):
        raise TypeError(f"kl_penalty must be a string, got {type(kl_penalty).__name__}")
    plus = kl_penalty.endswith("+")
    base = kl_penalty[:-1] if plus else kl_penalty
    if base not in _KL_NAMES:
        raise NotImplementedError(
            f"kl_penalty={kl_penalty!r} is not supported; expected one of {sorted(_KL_NAMES)}, "
            "optionally with '+'"
        )
    dtype = _float_dtype(logprob, ref_logprob)
    logprob, ref_logprob = torch.broadcast_tensors(logprob, ref_logprob)
    estimator = _KL_NAMES[base]
    clamp = _K3_CLAMP if estimator == "k3" else None
    if plus and estimator == "abs":
        value = fastppo.kl_penalty(logprob, ref_logprob, "abs")
        k2 = fastppo.kl_penalty(logprob, ref_logprob, "k2")
        return (k2 + (value - k2).detach()).to(dtype)
    if plus and estimator != "k2":  # "k2+" is k2 in value and gradient
        estimator += "+"
    return fastppo.kl_penalty(logprob, ref_logprob, estimator, clamp).to(dtype)


def compute_value_loss(
    vpreds: torch.Tensor,
    returns: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange_value: float,
    loss_agg_mode: str = "token-mean",
    dp_size: int = 1,
    batch_num_tokens=None,
    global_batch_size=None,
    loss_scale_factor=None,
):
    """verl's ``compute_value_loss``: clipped value loss by ``fastppo.value_loss``.

    v_c = values + clip(vpreds − values, ±cliprange_value); loss = ½·agg(max((vpreds − R)², (v_c − R)²))
    with ``agg`` and the global-batch arguments as in ``agg_loss``. A ``cliprange_value`` ≤ 0 has no
    fused form and runs in PyTorch.

    Args:
        vpreds: ``(B, T)`` critic outputs (receive the gradient).
        returns, values (the old values), response_mask: ``(B, T)``.

    Returns:
        ``(vf_loss, vf_clipfrac)``: 0-d tensors; clipfrac is the masked fraction of tokens where the
        clipped term is the larger one.
    """
    if isinstance(cliprange_value, bool) or not isinstance(cliprange_value, (int, float)):
        raise TypeError(f"cliprange_value must be a number, got {type(cliprange_value).__name__}")
    agg, factor = _global_agg(
        loss_agg_mode, response_mask, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor
    )
    dtype = _agg_dtype(loss_agg_mode, response_mask, vpreds, returns, values)
    if cliprange_value > 0:
        loss, clipfrac = fastppo.value_loss(
            vpreds, values, returns, response_mask, clip=cliprange_value, agg=agg
        )
        return (loss * factor).to(dtype), clipfrac
    clipped = torch.maximum(torch.minimum(vpreds, values + cliprange_value), values - cliprange_value)
    unclipped_loss, clipped_loss = (vpreds - returns).square(), (clipped - returns).square()
    vf_loss = 0.5 * agg_loss(
        torch.maximum(unclipped_loss, clipped_loss),
        response_mask,
        loss_agg_mode,
        dp_size,
        batch_num_tokens,
        global_batch_size,
        loss_scale_factor,
    )
    m = response_mask.float()
    clipfrac = (torch.where(m != 0, (clipped_loss > unclipped_loss).float(), 0.0) * m).sum() / (
        m.sum() + 1e-8
    )
    return vf_loss, clipfrac


# ---------------------------------------------------------------------------------------------
# Advantages


def compute_gae_advantage_return(
    token_level_rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: torch.Tensor,
    lam: torch.Tensor,
):
    """verl's ``compute_gae_advantage_return``: GAE by ``fastppo.gae(carry_masked=True)``, then whitening.

    Masked positions inside a response (multi-turn observations) carry the advantage and the next
    value over, as verl does. Returns are advantages + values before whitening; the advantages are
    whitened over ``response_mask`` (``fastppo.masked_whiten``). ``gamma``/``lam`` outside [0, 1]
    run fastppo's PyTorch reference of the same recursion.

    Args:
        token_level_rewards, values, response_mask: ``(B, T)``; the mask holds 0/1.
        gamma, lam: numbers (or 0-d tensors).

    Returns:
        ``(advantages, returns)``, ``(B, T)`` in the inputs' dtype.

    Raises:
        ValueError: the mask holds fewer than two tokens (verl's unbiased variance needs two).
    """
    gamma, lam = float(gamma), float(lam)
    dtype = _float_dtype(token_level_rewards, values, response_mask)
    if 0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0:
        advantages, returns = fastppo.gae(token_level_rewards, values, response_mask, gamma=gamma, lam=lam)
    else:
        advantages, returns = reference.gae(token_level_rewards, values, response_mask, gamma=gamma, lam=lam)
    tokens = float(response_mask.sum())
    if tokens == 0:
        raise ValueError("response_mask must select at least one element to whiten the advantages")
    if tokens == 1:
        raise ValueError(
            "response_mask selects one element: the unbiased variance of the advantages divides by zero"
        )
    return fastppo.masked_whiten(advantages, response_mask).to(dtype), returns.to(dtype)


def _group_ids(index, batch_size: int, device) -> torch.Tensor:
    """Integer group ids from verl's ``index`` (uids of any hashable kind, compared as verl's dict does)."""
    if len(index) < batch_size:
        raise ValueError(f"index must hold one uid per response ({batch_size}), got {len(index)}")
    ids: dict = {}
    group = [ids.setdefault(index[i], len(ids)) for i in range(batch_size)]
    return torch.tensor(group, dtype=torch.int64, device=device)


def compute_grpo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config=None,
):
    """verl's ``compute_grpo_outcome_advantage`` by ``fastppo.group_advantages``.

    Score s = Σ_t rewards; per group of equal ``index``: (s − mean)/(std + epsilon) (std unbiased),
    or s − mean without ``norm_adv_by_std_in_grpo`` (Dr. GRPO); a group of one has mean 0, std 1.

    Args:
        token_level_rewards, response_mask: ``(B, T)``.
        index: ``(B,)`` uids (numpy array of str/int, list, ...).
        epsilon: > 0.

    Returns:
        ``(advantages, advantages)``, ``(B, T)``: the per-response advantage times the mask.
    """
    scores = token_level_rewards.sum(dim=-1)
    group = _group_ids(index, scores.shape[0], scores.device)
    method = "grpo" if norm_adv_by_std_in_grpo else "dr_grpo"
    scores = fastppo.group_advantages(scores, group, method=method, eps=epsilon).to(scores.dtype)
    scores = scores.unsqueeze(-1) * response_mask
    return scores, scores


def compute_rloo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index,
    epsilon: float = 1e-6,
    config=None,
    **kwargs,
):
    """verl's ``compute_rloo_outcome_advantage`` by ``fastppo.group_advantages(method="rloo")``.

    Score s = Σ_t rewards; in a group of n > 1: s·n/(n−1) − mean·n/(n−1) (the leave-one-out
    baseline); a group of one keeps s. ``epsilon`` and extra keyword arguments are unused, as in verl.

    Returns:
        ``(advantages, advantages)``, ``(B, T)``.
    """
    scores = token_level_rewards.sum(dim=-1)
    group = _group_ids(index, scores.shape[0], scores.device)
    scores = fastppo.group_advantages(scores, group, method="rloo").to(scores.dtype)
    scores = scores.unsqueeze(-1) * response_mask
    return scores, scores


# ---------------------------------------------------------------------------------------------
# Log-probs and entropy (verl.utils.torch_functional)


def _verl_in_place_ce() -> bool:
    """Whether verl itself would run flash-attn's cross entropy (fp32 out, in-place backward)."""
    verl_F = importlib.import_module(_TORCH_FUNCTIONAL)
    available = getattr(verl_F, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", False)
    return bool(available) and os.environ.get("VERL_DISABLE_FLASH_ATTN_CE", "0") != "1"


def linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None):
    """verl's fused lm_head + log-prob entry (``verl.utils.kernel.linear_cross_entropy``):
    ``(log_probs, entropy)``, each ``(N,)`` fp32 over the flattened tokens of ``hidden`` (..., H)
    and ``labels`` (...). A reduction other than "none" or a vocabulary split across
    ``dist_process_group`` runs verl's own."""
    if str(reduction).lower() != "none" or dist_process_group is not None:
        original = VERL.original(_LINEAR_CE, "linear_cross_entropy")
        return original(hidden, weight, labels, temperature, reduction, dist_process_group)
    return fastppo.linear_logprobs(
        hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), temperature=temperature,
        return_entropy=True,
    )  # fmt: skip


def logprobs_from_logits(logits, labels, inplace_backward=True):
    """verl's ``logprobs_from_logits`` by ``fastppo.token_logprobs``.

    The in-place backward (the logits' gradient written into their storage) is used only where
    verl would use it (flash-attn's cross entropy available and not disabled); then the result is
    fp32 as flash-attn's, otherwise in the logits' dtype as verl's PyTorch path. Labels equal to
    -100 give 0.

    Args:
        logits: ``(..., V)``; labels: ``(...)`` integer in [0, V).

    Returns:
        ``(...)`` log-probabilities.
    """
    in_place = _verl_in_place_ce()
    logp = fastppo.token_logprobs(logits, labels, inplace_backward=bool(inplace_backward) and in_place)
    return logp if in_place else logp.to(logits.dtype)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    labels = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    return fastppo.token_logprobs(logits, labels, return_entropy=True, check_labels=False)[1]


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """verl's ``entropy_from_logits``: ``(..., V)`` → ``(...)`` entropy in the logits' dtype
    (fastppo's fused pass, its log-prob output unused)."""
    return _entropy(logits).to(logits.dtype)


def entropy_from_logits_with_chunking(logits: torch.Tensor, chunk_size: int = 2048) -> torch.Tensor:
    """verl's ``entropy_from_logits_with_chunking``: ``(N, V)`` → ``(N,)`` fp32. fastppo streams the
    vocabulary in tiles, so ``chunk_size`` (verl's memory bound) is accepted and not needed."""
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (N, V), got {tuple(logits.shape)}")
    return _entropy(logits).to(torch.float32)


# ---------------------------------------------------------------------------------------------
# Patching

_FUNCTIONS = {
    _CORE: (
        "compute_gae_advantage_return",
        "compute_grpo_outcome_advantage",
        "compute_rloo_outcome_advantage",
        "kl_penalty",
        "agg_loss",
        *POLICY_LOSSES.values(),
        "compute_value_loss",
    ),
    _TORCH_FUNCTIONAL: ("logprobs_from_logits", "entropy_from_logits", "entropy_from_logits_with_chunking"),
    _LINEAR_CE: ("linear_cross_entropy",),
}
_ADV_ESTIMATORS = {
    "gae": "compute_gae_advantage_return",
    "grpo": "compute_grpo_outcome_advantage",
    "rloo": "compute_rloo_outcome_advantage",
}


def register() -> None:
    """Register fastppo's policy losses with verl as ``"fastppo_vanilla"``, ``"fastppo_gspo"``,
    ``"fastppo_cispo"``, ``"fastppo_sapo"`` and ``"fastppo_geo_mean"`` (imports verl).

    A side effect on verl's policy-loss registry, so it happens here, never at import; ``patch()``
    adds the same entries (and ``unpatch()`` removes them again if ``patch()`` added them).
    """
    core = importlib.import_module(_CORE)
    for registered, name in REGISTERED_NAMES.items():
        core.register_policy_loss(registered)(globals()[name])


for _module, _names in _FUNCTIONS.items():
    for _name in _names:
        VERL.add(_module, _name, globals()[_name])
# The names register() adds, always; verl's own names only while they hold verl's own function.
for _key, _name in REGISTERED_NAMES.items():
    VERL.add_entry(_CORE, "POLICY_LOSS_REGISTRY", _key, globals()[_name])
for _key, _name in POLICY_LOSSES.items():
    VERL.add_entry(_CORE, "POLICY_LOSS_REGISTRY", _key, globals()[_name], only_over=_name)
for _key, _name in _ADV_ESTIMATORS.items():
    VERL.add_entry(_CORE, "ADV_ESTIMATOR_REGISTRY", _key, globals()[_name], only_over=_name)


def patch(force: bool = False) -> bool:
    """Install fastppo's functions in verl (see the module docstring); a second call changes nothing.
    Call it in every process that computes losses (verl's Ray workers too), before verl builds its
    engines. Outside the tested verl versions (``~=0.9.1``) it warns once and installs nothing
    unless ``force``; returns whether fastppo's functions are installed."""
    return VERL.patch(force)


def unpatch() -> None:
    """Restore verl's functions and registry entries exactly as ``patch()`` found them."""
    VERL.unpatch()


def patched(force: bool = False):
    """Context manager: ``with patched(): ...`` runs the block with fastppo installed in verl."""
    return VERL.patched(force)
