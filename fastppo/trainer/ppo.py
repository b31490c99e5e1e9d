"""PPO (with a critic) and GRPO / RLOO (critic-free) on Hugging Face causal LMs, top to bottom.

Each iteration: sample prompts → generate → score → log-probs of the policy and the reference
(``fastppo.token_logprobs`` at the sampling temperature) and values → per-token rewards shaped
by the KL (``shape_rewards``) → ``gae`` and ``masked_whiten`` (or ``group_advantages``) →
``ppo_epochs`` passes of shuffled mini-batches, each accumulated over micro-batches planned by
``fastppo.packing.plan_microbatches``, with ``ppo_policy_loss`` and ``value_loss`` computed on
packed response tokens.
"""

import copy
import importlib
import math
import random
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    get_scheduler,
)

import fastppo
from fastppo import packing
from fastppo.trainer import checkpoint, runtime, tiny
from fastppo.trainer.config import PPOConfig
from fastppo.trainer.data import apply_template, read_rows
from fastppo.trainer.metrics import MetricsWriter

# --------------------------------------------------------------------------------------------
# Set-up: models, prompts, reward.


def load_models(cfg: PPOConfig, attention: str):
    """Tokenizer, policy, reference (a frozen copy of the policy) and critic (None without one);
    ``attention`` is the transformers ``attn_implementation`` of all three."""
    if cfg.policy is None:
        tokenizer = tiny.build_tokenizer()
        policy = tiny.build_policy(tokenizer, cfg.seed, attention)
    else:
        tokenizer = AutoTokenizer.from_pretrained(cfg.policy)
        policy = AutoModelForCausalLM.from_pretrained(cfg.policy, attn_implementation=attention)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    disable_dropout(policy)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    critic = None
    if cfg.algo == "ppo":
        if cfg.critic is None and cfg.policy is None:
            critic = tiny.build_critic(tokenizer, cfg.seed, attention)
        else:
            critic = AutoModelForTokenClassification.from_pretrained(
                cfg.critic or cfg.policy, num_labels=1, attn_implementation=attention
            )
        disable_dropout(critic)
    return tokenizer, policy, reference, critic


def disable_dropout(model: torch.nn.Module) -> None:
    """PPO compares log-probs from two forward passes of the same weights: with dropout their
    ratio would not be 1 before any update, and the values would be noisy."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def load_prompts(cfg: PPOConfig) -> list[str]:
    if cfg.prompts is None:
        return tiny.synthetic_prompts(4096, cfg.seed)
    return [row["prompt"] for row in read_rows(cfg.prompts, ("prompt",))]


def load_reward(cfg: PPOConfig, tokenizer):
    """A function (prompts, responses) -> list of float scores."""
    if cfg.reward == "echo":
        return tiny.echo_reward
    if Path(cfg.reward).exists():
        model = AutoModelForSequenceClassification.from_pretrained(cfg.reward, num_labels=1).eval()

        @torch.no_grad()
        def model_reward(prompts, responses):
            batch = tokenizer(
                [p + r for p, r in zip(prompts, responses, strict=True)], return_tensors="pt", padding=True
            )
            return model(**batch).logits[:, 0].float().tolist()

        return model_reward
    module, _, name = cfg.reward.partition(":")
    if not name:
        raise ValueError(f"reward must be 'echo', a model path or 'module:function', got {cfg.reward!r}")
    return getattr(importlib.import_module(module), name)


# --------------------------------------------------------------------------------------------
# Rollout.


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def encode_prompts(tokenizer, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask (for generation), with BOS when the tokenizer has one and
    its chat template when it has one."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = [bos + tokenizer(apply_template(tokenizer, p), add_special_tokens=False).input_ids for p in prompts]
    batch = packing.collate(ids, tokenizer.pad_token_id, side="left")
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def ends_at_eos(responses: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """A response ends at its first EOS (included); what generate writes after it is padding."""
    eos = (responses == eos_token_id).long()
    return (eos.cumsum(1) - eos) == 0


def predicting_outputs(model, device, batch: dict, prompt_len: int, padding_free: bool):
    """Run ``model`` on whole sequences; return its output at the positions that predict a
    response token, the labels aligned with them, and where the labels are response tokens.

    ``batch`` holds ``sequences``, ``attention_mask`` and the response ``labels`` ``(B, R)``.
    Padded: ``(B, R, ...)`` and ``(B, R)``, a view of ``logits[:, P-1:-1]``. Padding-free: the
    attended tokens of all rows packed into one row (``runtime.packed_logits``), so ``(N, ...)``
    and ``(N,)`` with label -100 where a position predicts no response token.
    Either way ``out[keep]`` lists the response tokens row by row.
    """
    P = prompt_len
    sequences, attention_mask, labels = batch["sequences"], batch["attention_mask"], batch["labels"]
    with runtime.autocast(device):
        if not padding_free:
            logits = model(
                input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                use_cache=False,
            ).logits[:, P - 1 : -1]  # fmt: skip
        else:
            layout = packing.unpad(attention_mask)
            all_labels = torch.full_like(sequences, -100)
            all_labels[:, P - 1 : -1] = labels  # the last prompt token and the response tokens are attended
            logits, labels = runtime.packed_logits(model, sequences, layout), packing.pack(all_labels, layout)
    return logits, labels, labels != -100


def to_padded(flat: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Response-token values listed row by row, back to ``(B, R)`` with zeros after each response."""
    out = torch.zeros(response_mask.shape, dtype=flat.dtype, device=flat.device)
    return out.masked_scatter(response_mask, flat)


@torch.no_grad()
def rollout(cfg, policy, reference, critic, tokenizer, prompts, reward_fn, kl_coef, device):
    """Generate, score and compute everything the update needs, for one batch of prompts."""
    prompts = [p for p in prompts for _ in range(cfg.group_size)]
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)
    P = prompt_ids.shape[1]
    policy.eval()
    if critic is not None:
        critic.eval()
    with runtime.autocast(device):
        # Sharded weights: every generation step is a collective, so all ranks step until all are done.
        synced = runtime.is_sharded(policy)
        sequences = runtime.unwrap(policy).generate(
            input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True, temperature=cfg.temperature,
            top_p=cfg.top_p, top_k=0, max_new_tokens=cfg.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, synced_gpus=synced,
        )  # fmt: skip
    responses = sequences[:, P:]
    response_mask = ends_at_eos(responses, tokenizer.eos_token_id)
    attention_mask = torch.cat([prompt_mask.bool(), response_mask], 1)
    texts = tokenizer.batch_decode(
        torch.where(response_mask, responses, tokenizer.pad_token_id), skip_special_tokens=True
    )
    scores = torch.tensor(reward_fn(prompts, texts), dtype=torch.float32, device=device)

    labels = torch.where(response_mask, responses, -100)

    scored = dict(sequences=sequences, attention_mask=attention_mask, labels=labels)

    def response_logprobs(model):  # (B, R), 0 after each response
        logits, out_labels, keep = predicting_outputs(model, device, scored, P, cfg.padding_free)
        logp = fastppo.token_logprobs(logits, out_labels, temperature=cfg.temperature)
        return to_padded(logp[keep], response_mask)

    old_logp, ref_logp = response_logprobs(policy), response_logprobs(reference)
    mask = response_mask.float()
    kl = fastppo.kl_penalty(old_logp, ref_logp, "k1") * mask
    if critic is not None:
        logits, _, keep = predicting_outputs(critic, device, scored, P, cfg.padding_free)
        values = to_padded(logits[..., 0][keep].float(), response_mask)
        rewards = fastppo.shape_rewards(scores, response_mask, kl=kl, kl_coef=kl_coef)
        advantages, returns = fastppo.gae(rewards, values, response_mask, gamma=cfg.gamma, lam=cfg.lam)
    else:
        group_ids = torch.arange(len(prompts), device=device) // cfg.group_size
        per_sequence = fastppo.group_advantages(
            scores, group_ids, method="grpo" if cfg.algo == "grpo" else "rloo"
        )
        advantages, values, returns = per_sequence[:, None] * mask, None, None
    data = dict(
        sequences=sequences, attention_mask=attention_mask, labels=labels, response_mask=response_mask,
        old_logp=old_logp, ref_logp=ref_logp, advantages=advantages, values=values, returns=returns,
        scores=scores, kl=kl,
    )  # fmt: skip
    # Responses cut at max_new_tokens may be left out of the update (their scores still count).
    keep = (responses == tokenizer.eos_token_id).any(1) if cfg.drop_truncated else None
    update = {k: v if v is None or keep is None else v[keep] for k, v in data.items()}
    if cfg.whiten_advantages and update["response_mask"].any():
        m = update["response_mask"]
        update["advantages"] = fastppo.masked_whiten(update["advantages"], m) * m
    lengths = response_mask.sum(1).float()
    return {**update, "scores": scores, "kl": kl, "lengths": lengths, "prompt_len": P}


# --------------------------------------------------------------------------------------------
# Update.


def micro_batch_losses(cfg, policy, critic, data, idx, n_tokens, kl_coef, device):
    """Losses of the micro-batch ``idx``, scaled so that the micro-batches of a mini-batch add up to
    its token mean. Losses are computed on packed response tokens."""
    take = lambda key: data[key][idx]  # noqa: E731
    response_mask = take("response_mask")
    flat = lambda x: x[response_mask]  # noqa: E731 (response tokens, row by row)
    batch = {key: take(key) for key in ("sequences", "attention_mask", "labels")}

    logits, labels, keep = predicting_outputs(policy, device, batch, data["prompt_len"], cfg.padding_free)
    logp, entropy = fastppo.token_logprobs(logits, labels, temperature=cfg.temperature, return_entropy=True)
    logp = logp[keep]
    ones = torch.ones_like(logp)
    in_loss_kl = cfg.algo != "ppo" and kl_coef > 0  # critic-free methods put the KL in the loss
    policy_loss, stats = fastppo.ppo_policy_loss(
        logp, flat(take("old_logp")), flat(take("advantages")), ones, agg="token-sum",
        clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip,
        ref_logp=flat(take("ref_logp")) if in_loss_kl else None, kl_coef=kl_coef if in_loss_kl else 0.0,
        entropy=entropy[keep], entropy_coef=cfg.entropy_coef,
    )  # fmt: skip
    loss = policy_loss / n_tokens
    value_loss = torch.zeros((), device=device)
    if critic is not None:
        values, _, keep = predicting_outputs(critic, device, batch, data["prompt_len"], cfg.padding_free)
        value_loss, _ = fastppo.value_loss(
            values[..., 0][keep].float(), flat(take("values")), flat(take("returns")), ones,
            clip=cfg.value_clip, agg="token-sum",
        )  # fmt: skip
        loss = loss + cfg.value_coef * value_loss / n_tokens
    return loss, policy_loss.detach() / n_tokens, value_loss.detach() / n_tokens, stats


def accumulate_gradients(cfg, policy, critic, data, mb, kl_coef, device, distributed, totals) -> None:
    """Backward of mini-batch ``mb`` over the micro-batches planned for its token budget.

    Ranks plan their own micro-batches, then split some until all have the same count (FSDP runs
    collectives in every forward and backward); gradients are reduced on the last one only.
    """
    n_tokens = max(int(data["response_mask"][mb].sum()), 1)
    seqlens = data["attention_mask"][mb].sum(1)
    micros = [m for m in packing.plan_microbatches(seqlens, cfg.max_tokens_per_microbatch) if m]
    micros = runtime.same_count_on_all_ranks(micros, device, distributed)
    models = [m for m in (policy, critic) if m is not None]
    for i, micro in enumerate(micros):
        with runtime.gradient_sync(models, enabled=i == len(micros) - 1):
            loss, policy_loss, value_loss, stats = micro_batch_losses(
                cfg, policy, critic, data, mb[micro], n_tokens, kl_coef, device
            )
            loss.backward()
        totals["policy_loss"] += policy_loss.item()
        totals["value_loss"] += value_loss.item()
        totals["clipfrac"] += stats["clipfrac"].item() * len(micro) / len(mb)
        totals["entropy"] += stats["entropy"].item() * len(micro) / len(mb)


def train(cfg: PPOConfig, log=print) -> list[dict]:
    """Run ``cfg``; returns the per-iteration metrics (also in output_dir/metrics.jsonl)."""
    device = runtime.resolve_device(cfg.device)
    distributed = runtime.init_distributed(device)
    runtime.seed_everything(cfg.seed)  # the same initial models on every rank
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    attention = runtime.attention_implementation(cfg.attention, device)
    if cfg.padding_free is None:
        cfg = replace(cfg, padding_free=runtime.varlen_attention(attention))
    tokenizer, policy, reference, critic = load_models(cfg, attention)
    policy, reference = policy.to(device), reference.to(device)
    critic = critic.to(device) if critic is not None else None
    prompts = load_prompts(cfg)
    reward_fn = load_reward(cfg, tokenizer)
    kl_coef, start = cfg.kl_coef, 0
    nonfinite = runtime.NonFiniteSteps(cfg.max_nonfinite_steps)
    last = checkpoint.latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and last is None:
        log(f"resume: no checkpoint in {out}, starting from scratch")
    if last is not None:
        load = lambda cls, name: cls.from_pretrained(last / name).state_dict()  # noqa: E731
        policy.load_state_dict(load(AutoModelForCausalLM, "policy"))
        reference.load_state_dict(load(AutoModelForCausalLM, "reference"))
        if critic is not None:
            critic.load_state_dict(load(AutoModelForTokenClassification, "critic"))

    # Wrap (DDP) or shard (FSDP2) before the optimizer: sharding replaces the parameters.
    if cfg.fsdp and not distributed.enabled:
        raise ValueError("fsdp needs several processes: launch with torchrun --nproc_per_node N")
    parallel = runtime.shard if cfg.fsdp else runtime.wrap
    policy = parallel(policy, device, distributed)
    critic = parallel(critic, device, distributed) if critic is not None else None
    prompts_per_iter = max(cfg.batch_size // cfg.group_size, 1)
    steps_per_iter = cfg.ppo_epochs * math.ceil(prompts_per_iter * cfg.group_size / cfg.minibatch_size)
    params = [{"params": list(policy.parameters()), "lr": cfg.lr}]
    if critic is not None:
        params.append({"params": list(critic.parameters()), "lr": cfg.critic_lr})
    optimizer = torch.optim.AdamW(params, weight_decay=0.0)
    trained = {"policy": policy} if critic is None else {"policy": policy, "critic": critic}
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=cfg.iterations * steps_per_iter)  # fmt: skip
    if last is not None:
        state = checkpoint.load_trainer_state(last)
        runtime.load_optimizer_state(trained, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"])
        kl_coef, start = state["kl_coef"], state["iteration"]
        log(f"resumed from {last} at iteration {start}")
    if distributed.enabled:  # every rank samples its own prompts and responses
        runtime.seed_everything(cfg.seed + 1000 * distributed.rank + start)

    history = []
    metrics = MetricsWriter(out, enabled=distributed.main, log=log)
    bar = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc=cfg.algo,
               disable=not distributed.main)  # fmt: skip
    for iteration in bar:
        t0 = time.time()
        batch_prompts = random.sample(prompts, min(prompts_per_iter, len(prompts)))
        data = rollout(cfg, policy, reference, critic, tokenizer, batch_prompts, reward_fn, kl_coef, device)
        n = data["sequences"].shape[0]
        # Every rank takes as many optimizer steps (they are collectives under DDP and FSDP): with
        # --drop_truncated the ranks keep different counts, so all update on the smallest count.
        n_used = torch.tensor([n], device=device)
        if distributed.enabled:
            torch.distributed.all_reduce(n_used, op=torch.distributed.ReduceOp.MIN)
        n_used = int(n_used)
        if n_used == 0:
            warnings.warn(f"iteration {iteration}: no sequence left for the update, skipped", stacklevel=1)

        policy.train()
        if critic is not None:
            critic.train()
        totals = {"policy_loss": 0.0, "value_loss": 0.0, "clipfrac": 0.0, "entropy": 0.0, "steps": 0}
        for _ in range(cfg.ppo_epochs if n_used > 0 else 0):
            for mb in torch.randperm(n, device=device)[:n_used].split(cfg.minibatch_size):
                optimizer.zero_grad(set_to_none=True)
                accumulate_gradients(cfg, policy, critic, data, mb, kl_coef, device, distributed, totals)
                all_params = [p for group in params for p in group["params"]]
                grad_norm = torch.nn.utils.clip_grad_norm_(all_params, cfg.max_grad_norm)
                grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                # Gradients are all-reduced before the norm: every rank takes the same decision.
                if not nonfinite.ok(bool(torch.isfinite(grad_norm)), f"iteration {iteration}"):
                    continue
                optimizer.step()
                scheduler.step()
                totals["steps"] += 1

        steps = max(totals.pop("steps"), 1)
        local = {
            "reward": float(data["scores"].mean()), "reward_std": float(data["scores"].std()),
            "kl": float(data["kl"].sum(1).mean()),  # per-sequence KL, summed over tokens
            "response_length": float(data["lengths"].mean()),
            "updated_fraction": n_used / len(data["scores"]), **{k: v / steps for k, v in totals.items()},
        }  # fmt: skip
        record = {"iteration": iteration + 1, **runtime.mean_over_ranks(local, device, distributed)}
        if cfg.kl_target is not None:  # adaptive controller (Ziegler et al.), same on every rank
            error = max(min(record["kl"] / cfg.kl_target - 1, 0.2), -0.2)
            kl_coef *= 1 + error * n * distributed.world_size / cfg.kl_horizon
        record.update(kl_coef=kl_coef, seconds=time.time() - t0)
        history.append(record)
        bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['kl']:.3f}")
        metrics.write(record, step=iteration + 1)
        done = iteration + 1 == cfg.iterations
        if done or (cfg.save_every and (iteration + 1) % cfg.save_every == 0):
            # Gathering sharded weights and optimizer states is a collective: every rank takes
            # part, rank 0 writes.
            full = {name: runtime.full_state_dict(model) for name, model in trained.items()}
            optimizer_state = runtime.optimizer_state(trained, optimizer)
            if distributed.main:
                state = dict(iteration=iteration + 1, kl_coef=kl_coef, config=asdict(cfg))
                state.update(optimizer=optimizer_state, scheduler=scheduler.state_dict())
                state.update(rng=checkpoint.rng_state())
                models = {"policy": runtime.unwrap(policy), "reference": reference,
                          "critic": runtime.unwrap(critic) if critic is not None else None}  # fmt: skip
                checkpoint.save_checkpoint(out, iteration + 1, models, tokenizer, state, state_dicts=full)
            if distributed.enabled:
                torch.distributed.barrier()
    metrics.close()
    if not cfg.fsdp:  # sharded weights differ across ranks by design
        runtime.check_in_sync(policy, device, distributed)
        if critic is not None:
            runtime.check_in_sync(critic, device, distributed)
        if distributed.enabled:
            log(f"rank {distributed.rank}: {distributed.world_size} ranks in sync")
    runtime.finish_distributed(distributed)
    return history
