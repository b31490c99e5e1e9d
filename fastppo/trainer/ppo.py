"""PPO and the critic-free presets (GRPO, Dr. GRPO, RLOO, REINFORCE++, DAPO, GSPO, CISPO) on Hugging Face
causal LMs, top to bottom:

    run = set_up(cfg)                            models, prompts, reward, optimizer, sampler; resume
    for every iteration:
        rollout = collect(...)                   generate (run.sampler), score, log-probs, values
        rollout = with_advantages(...)           cfg.advantage's estimator             (algorithms.py)
        totals = update(run, batch)              ppo_epochs × mini-batches × micro-batches, cfg.policy_loss
        run.sampler.sync(run.policy)             the engine samples from the new weights (sampling/)
        record metrics and time per phase, adapt the KL coefficient, save

Where the KL goes (``kl_in``), what the estimator needs (a critic, groups) and how the loss is
computed are read from the registries in ``algorithms.py``; nothing here branches on the preset.
"""

import contextlib
import copy
import gc
import json
import math
import random
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, get_scheduler

import fastppo
from fastppo import packing
from fastppo.trainer import algorithms, checkpoint, hub, loading, lora, runtime, sampling, timing, tiny
from fastppo.trainer.algorithms import ADVANTAGES, POLICY_LOSSES, AdvantageInputs, PolicyLossInputs
from fastppo.trainer.config import PPOConfig
from fastppo.trainer.data import DatasetPromptRows, PromptRows, check_chat_template, read_prompt_rows
from fastppo.trainer.errors import EngineError, Interrupted, UsageError
from fastppo.trainer.metrics import MetricsWriter
from fastppo.trainer.passes import token_logprobs_of, values_of
from fastppo.trainer.rewards import Rewards, load_rewards
from fastppo.trainer.rollout import Rollout, collect
from fastppo.trainer.rollout_stats import is_count, kl_per_token, rollout_metrics
from fastppo.trainer.sources import Source

# --------------------------------------------------------------------------------------------
# Set-up and resume.


def load_models(cfg: PPOConfig, attention: str, log=print):
    """Tokenizer, policy, reference (a frozen copy of the policy) and critic (None unless the
    advantage estimator needs one); ``attention`` is the ``attn_implementation`` of all three.

    With ``lora_r`` > 0 the policy is a peft model (a LoRA adapter on frozen base weights) and the
    reference is that same model with its adapter disabled (``lora.AdapterDisabled``), not a copy.
    The critic is always trained in full. ``gradient_checkpointing``: on in the policy and critic.
    A critic read from a causal LM's folder gets a new value head: ``log`` says so in one line."""
    if cfg.policy is None:
        tokenizer = tiny.build_tokenizer()
        policy = tiny.build_policy(tokenizer, cfg.seed, attention, tiny.head_dim_for(cfg.rollout_engine))
    else:
        tokenizer = hub.load_tokenizer(cfg.policy)
        policy = AutoModelForCausalLM.from_pretrained(cfg.policy, attn_implementation=attention)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    disable_dropout(policy)
    policy = lora.prepare(policy, cfg)  # gradient checkpointing; LoRA adapter when lora_r > 0
    if lora.is_peft(policy):
        reference = lora.AdapterDisabled(policy)
    else:
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
    critic = None
    if ADVANTAGES[cfg.advantage].needs_critic:
        if cfg.critic is None and cfg.policy is None:
            critic = tiny.build_critic(tokenizer, cfg.seed, attention, tiny.head_dim_for(cfg.rollout_engine))
        else:
            critic = loading.from_pretrained_with_new_head(
                AutoModelForTokenClassification, cfg.critic or cfg.policy, "critic", log,
                num_labels=1, attn_implementation=attention,
            )  # fmt: skip
        disable_dropout(critic)
        if cfg.gradient_checkpointing:
            lora.enable_gradient_checkpointing(critic)
    return tokenizer, policy, reference, critic


def disable_dropout(model: torch.nn.Module) -> None:
    """PPO compares log-probs from two forward passes of the same weights: with dropout their
    ratio would not be 1 before any update, and the values would be noisy."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def load_prompts(cfg: PPOConfig, tokenizer=None) -> PromptRows | DatasetPromptRows:
    """``--prompts``' rows, read from its dataset when sampled (the reward gets every other column),
    or the echo task's prompts. With ``tokenizer``: chat-message prompts need its chat template."""
    if cfg.prompts is None:
        return PromptRows(tiny.synthetic_prompts(4096, cfg.seed))
    rows = read_prompt_rows(Source.of(cfg, "prompts"), cfg.prompt_column)
    if tokenizer is not None:
        check_chat_template(tokenizer, rows.take(range(min(len(rows), 16)))[0], "policy")
    return rows


@dataclass
class Run:
    """What every iteration of one run reads: set up once by ``set_up``."""

    cfg: PPOConfig
    device: torch.device
    distributed: runtime.Distributed
    out: Path
    tokenizer: object
    policy: torch.nn.Module  # wrapped (DDP) or sharded (FSDP2) under torchrun
    reference: torch.nn.Module
    critic: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: object
    prompts: PromptRows | DatasetPromptRows
    reward: Rewards
    kl_coef: float
    start: int  # iterations done before this process started (resume)
    nonfinite: runtime.NonFiniteSteps
    sampler: sampling.Sampler | None = None  # the rollout engine (cfg.rollout_engine)

    @property
    def trained(self) -> dict[str, torch.nn.Module]:
        return {"policy": self.policy} | ({"critic": self.critic} if self.critic is not None else {})

    @property
    def prompts_per_iteration(self) -> int:
        return max(self.cfg.batch_size // self.cfg.group_size, 1)


def set_up(cfg: PPOConfig, log) -> Run:
    device = runtime.resolve_device(cfg.device)
    distributed = runtime.init_distributed(device)
    runtime.seed_everything(cfg.seed)  # the same initial models on every rank
    out = Path(cfg.output_dir)
    checkpoint.claim_run_folder(out, resume=cfg.resume, overwrite=cfg.overwrite, clear=distributed.main)
    if distributed.enabled:  # every rank has looked at the folder before rank 0 writes into it
        torch.distributed.barrier()
    out.mkdir(parents=True, exist_ok=True)
    if distributed.main:  # what this run was asked, beside what it logs
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1) + "\n")
    attention = runtime.attention_implementation(cfg.attention, device)
    if cfg.padding_free is None:
        cfg = replace(cfg, padding_free=runtime.varlen_attention(attention))
    quiet = lambda *_: None  # noqa: E731
    tokenizer, policy, reference, critic = load_models(cfg, attention, log if distributed.main else quiet)
    policy, reference = policy.to(device), reference.to(device)
    critic = critic.to(device) if critic is not None else None
    last = checkpoint.latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and last is None:
        log(f"resume: no checkpoint in {out}, starting from scratch")
    if last is not None:
        load = lambda cls, name: cls.from_pretrained(last / name).state_dict()  # noqa: E731
        if lora.is_peft(policy):  # the adapter; the reference is the base, loaded as at the start
            lora.load_adapter(policy, last / "policy")
        else:
            policy.load_state_dict(load(AutoModelForCausalLM, "policy"))
            reference.load_state_dict(load(AutoModelForCausalLM, "reference"))
        if critic is not None:
            critic.load_state_dict(load(AutoModelForTokenClassification, "critic"))

    # Wrap (DDP) or shard (FSDP2) before the optimizer: sharding replaces the parameters.
    if cfg.fsdp and not distributed.enabled:
        raise UsageError("fsdp needs several processes: launch with torchrun --nproc_per_node N")
    parallel = runtime.shard if cfg.fsdp else runtime.wrap
    policy = parallel(policy, device, distributed)
    critic = parallel(critic, device, distributed) if critic is not None else None
    params = [{"params": lora.trainable_parameters(policy), "lr": cfg.lr}]  # LoRA: the adapter's
    if critic is not None:
        params.append({"params": list(critic.parameters()), "lr": cfg.critic_lr})
    optimizer = torch.optim.AdamW(params, weight_decay=0.0)
    run = Run(
        cfg=cfg, device=device, distributed=distributed, out=out, tokenizer=tokenizer, policy=policy,
        reference=reference, critic=critic, optimizer=optimizer, scheduler=None,
        prompts=load_prompts(cfg, tokenizer), reward=load_rewards(cfg, tokenizer, device),
        kl_coef=cfg.kl_coef, start=0,
        nonfinite=runtime.NonFiniteSteps(cfg.max_nonfinite_steps),
    )  # fmt: skip
    run.reward.check_columns(run.prompts.column_names)  # --reward math without an answer column: now
    steps_per_iteration = cfg.ppo_epochs * math.ceil(
        run.prompts_per_iteration * cfg.group_size / cfg.minibatch_size
    )
    run.scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                                  num_training_steps=cfg.iterations * steps_per_iteration)  # fmt: skip
    if last is not None:
        state = checkpoint.load_trainer_state(last)
        runtime.load_optimizer_state(run.trained, optimizer, state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"])
        run.kl_coef, run.start = state["kl_coef"], state["iteration"]
        log(f"resumed from {last} at iteration {run.start}")
    if distributed.enabled:  # every rank samples its own prompts and responses
        runtime.seed_everything(cfg.seed + 1000 * distributed.rank + run.start)
    run.sampler = sampling.build(cfg, run, log)  # an engine starts from the trainer's weights
    return run


# --------------------------------------------------------------------------------------------
# One iteration: rollout → advantages → update.


def sampling_settings(cfg: PPOConfig, sampler: sampling.Sampler) -> sampling.SamplingSettings:
    """The sampler's log-probs are kept for rollout correction, and whenever the sampler is not the
    policy itself (they measure how far its distribution is from the trainer's)."""
    return sampling.SamplingSettings(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
        logprobs=cfg.rollout_is != "off" or not sampler.is_policy,
    )  # fmt: skip


def sample_rollout(run: Run, phases=None) -> Rollout:
    cfg = run.cfg
    index = random.sample(range(len(run.prompts)), min(run.prompts_per_iteration, len(run.prompts)))
    prompts, columns = run.prompts.take(index)
    return collect(
        run.policy, run.reference, run.critic, run.sampler, run.tokenizer, prompts, run.reward,
        run.device, group_size=cfg.group_size, settings=sampling_settings(cfg, run.sampler),
        padding_free=cfg.padding_free, fused=cfg.fused_lm_head, phases=phases or timing.Phases(run.device),
        columns=columns,
    )  # fmt: skip


def kept_for_update(cfg: PPOConfig, rollout: Rollout) -> torch.Tensor:
    """(B,) bool: the responses the update uses (all but the truncated ones with drop_truncated,
    and the groups of equal scores with dynamic_sampling). Their scores still count in the metrics."""
    keep = torch.ones(len(rollout), dtype=torch.bool, device=rollout.scores.device)
    if cfg.drop_truncated:
        keep &= ~rollout.truncated
    if cfg.dynamic_sampling:
        keep &= algorithms.groups_with_spread(rollout.scores, rollout.group_ids)
    return keep


def with_advantages(cfg: PPOConfig, rollout: Rollout, keep: torch.Tensor, kl_coef: float) -> Rollout:
    """The rollout with ``advantages`` (and the critic's ``returns``) from cfg.advantage's
    estimator; whitening statistics come from the ``keep`` (B,) responses."""
    inputs = AdvantageInputs(
        scores=rollout.scores, mask=torch.ones_like(rollout.old_logp, dtype=torch.bool),
        group_ids=rollout.group_ids, values=rollout.values, kl=kl_per_token(rollout, cfg.kl_estimator),
        kl_coef=kl_coef if cfg.kl_in == "reward" else 0.0, gamma=cfg.gamma, lam=cfg.lam,
        cu_seqlens=rollout.cu_seqlens,
    )  # fmt: skip
    estimator = ADVANTAGES[cfg.advantage].bound(cfg)  # its own hyperparameters from cfg
    adv, returns = algorithms.advantages(estimator, inputs, whiten=cfg.whiten_advantages, keep=keep)
    return replace(rollout, advantages=adv, returns=returns)


def micro_batch_losses(
    cfg: PPOConfig,
    policy,
    critic,
    batch: Rollout,
    *,
    kl_coef: float,
    normaliser: float,
    n_tokens: int,
    device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Losses of one micro-batch, scaled so that the micro-batches of a mini-batch add up to its
    aggregate (``normaliser``: see ``algorithms.loss_normaliser``; the value loss is a token
    mean over the mini-batch's ``n_tokens``). The policy and critic passes share one layout, and
    the loss reads the packed per-token tensors as they are: nothing is read back to the host."""
    tokens = batch.tokens(cfg.padding_free)
    with runtime.autocast(device):
        logp, entropy = token_logprobs_of(
            policy, tokens, temperature=cfg.temperature, entropy=True, fused=cfg.fused_lm_head
        )
    kl_in_loss = cfg.kl_in == "loss" and kl_coef > 0
    weights = algorithms.token_weights(batch.cu_seqlens, logp.shape[0], cfg.loss_agg)
    corrected = cfg.rollout_is != "off"
    policy_sum, stats = POLICY_LOSSES[cfg.policy_loss].bound(cfg).compute(PolicyLossInputs(
        logp=logp, old_logp=batch.old_logp, advantages=batch.advantages, weights=weights,
        cu_seqlens=batch.cu_seqlens, ref_logp=batch.ref_logp if kl_in_loss else None, kl_coef=kl_coef,
        kl_estimator=cfg.kl_estimator, entropy=entropy, entropy_coef=cfg.entropy_coef,
        rollout_logp=batch.rollout_logp if corrected else None,
        rollout_correction=cfg.rollout_correction(),
    ))  # fmt: skip
    loss = policy_sum / normaliser
    value_loss = torch.zeros((), device=device)
    if critic is not None:
        with runtime.autocast(device):
            values = values_of(critic, tokens)
        ones = torch.ones_like(values)
        value_loss, _ = fastppo.value_loss(values, batch.values, batch.returns, ones, clip=cfg.value_clip,
                                           agg="token-sum")  # fmt: skip
        value_loss = value_loss / n_tokens
        loss = loss + cfg.value_coef * value_loss
    return loss, policy_sum.detach() / normaliser, value_loss.detach(), stats


#: Statistics of the policy loss averaged over micro-batches into the iteration's metrics (with
#: rollout_is also the fraction of tokens its weights truncated or masked; the weights themselves
#: are measured over the whole rollout, ``sampler_metrics``).
LOSS_STATS = ("clipfrac", "clipfrac_lower", "approx_kl", "approx_kl_k3", "entropy")


def loss_stats(cfg: PPOConfig) -> tuple[str, ...]:
    return LOSS_STATS + (("is_filtered",) if cfg.rollout_is != "off" else ())


@dataclass
class LossTotals:
    """The update's losses and loss statistics, summed over micro-batches on the device and read to
    the host once per iteration (``means``): no device-to-host read in the micro-batch loop."""

    names: tuple[str, ...]  # "policy_loss", "value_loss", then ``loss_stats(cfg)``
    sums: torch.Tensor  # (K,) fp32, on the training device

    @classmethod
    def zeros(cls, cfg: PPOConfig, device: torch.device) -> "LossTotals":
        names = ("policy_loss", "value_loss", *loss_stats(cfg))
        return cls(names, torch.zeros(len(names), device=device))

    def add(self, values: dict[str, torch.Tensor]) -> None:
        """Add one micro-batch's 0-d ``values`` of every name."""
        self.sums += torch.stack([values[name].detach().float().reshape(()) for name in self.names])

    def means(self, steps: int) -> dict[str, float]:
        """Each sum over ``steps`` optimizer steps (one read from the device)."""
        return dict(zip(self.names, (self.sums / max(steps, 1)).tolist(), strict=True))


def accumulate_gradients(run: Run, batch: Rollout, totals: LossTotals) -> None:
    """Backward of one mini-batch over the micro-batches planned for its token budget.

    Ranks plan their own micro-batches, then split some until all have the same count (FSDP runs
    collectives in every forward and backward); gradients are reduced on the last one only.
    Planned on the host from the lengths the rollout read once: each micro-batch's index tensors
    are copied to the device, and nothing is read back (statistics are summed in ``totals``).
    """
    cfg = run.cfg
    lengths = batch.response_lengths  # (B,) on the host
    n_tokens = max(int(lengths.sum()), 1)
    normaliser = algorithms.loss_normaliser(lengths, cfg.loss_agg, cfg.max_new_tokens)
    micros = [
        m for m in packing.plan_microbatches(batch.host_attention.sum(1), cfg.max_tokens_per_microbatch) if m
    ]
    micros = runtime.same_count_on_all_ranks(micros, run.device, run.distributed)
    models = list(run.trained.values())
    for i, micro in enumerate(micros):
        with runtime.gradient_sync(models, enabled=i == len(micros) - 1):
            loss, policy_loss, value_loss, stats = micro_batch_losses(
                cfg, run.policy, run.critic, batch.select(micro),
                kl_coef=run.kl_coef, normaliser=normaliser, n_tokens=n_tokens, device=run.device,
            )  # fmt: skip
            loss.backward()
        stats["approx_kl_k3"] = stats["ratio_mean"] - 1 + stats["approx_kl"]  # mean of (r − 1) − log r
        share = len(micro) / len(batch)  # the statistics are means over the mini-batch's sequences
        totals.add({"policy_loss": policy_loss, "value_loss": value_loss}
                   | {key: stats[key] * share for key in loss_stats(cfg)})  # fmt: skip


def update(run: Run, batch: Rollout, iteration: int) -> dict:
    """``ppo_epochs`` passes of shuffled mini-batches over ``batch``; returns the mean losses and
    stats, how many sequences each pass used, and ``skipped_update`` (1 when none was left, so no
    step was taken: counted, and summed up once at the end of ``train``).
    Every rank takes as many optimizer steps (collectives under DDP and FSDP): ranks that keep
    different numbers of responses all update on the smallest count.
    Reads from the device: the non-finite-gradient guard once per optimizer step, the totals once
    (and the smallest count once under DDP/FSDP); mini-batches are drawn on the host."""
    cfg, device = run.cfg, run.device
    n_used = len(batch)
    if run.distributed.enabled:
        n = torch.tensor([n_used], device=device)
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MIN)
        n_used = int(n)
    for model in run.trained.values():
        model.train()
    totals = LossTotals.zeros(cfg, device)
    steps = 0
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    for _ in range(cfg.ppo_epochs if n_used > 0 else 0):
        order = random.sample(range(len(batch)), len(batch))[:n_used]  # python's generator: host-side
        for start in range(0, n_used, cfg.minibatch_size):
            mb = order[start : start + cfg.minibatch_size]
            run.optimizer.zero_grad(set_to_none=True)
            accumulate_gradients(run, batch.select(mb), totals)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            # Gradients are all-reduced before the norm: every rank takes the same decision.
            if not run.nonfinite.ok(bool(torch.isfinite(grad_norm)), f"iteration {iteration}"):
                continue
            run.optimizer.step()
            run.scheduler.step()
            steps += 1
    return totals.means(steps) | {"updated_sequences": n_used, "skipped_update": float(n_used == 0)}


def iterate(run: Run, iteration: int) -> dict:
    """One iteration; returns its metrics (averaged over ranks), with the seconds of each phase."""
    started = time.time()
    phases = timing.Phases(run.device)
    rollout = sample_rollout(run, phases)
    run.sampler.sleep()  # an engine's memory goes back to the update
    keep = kept_for_update(run.cfg, rollout)
    rollout = with_advantages(run.cfg, rollout, keep, run.kl_coef)
    local = rollout_metrics(rollout)
    with phases("update"):
        local |= update(run, rollout.select(keep), iteration)
    run.sampler.wake()
    local["updated_fraction"] = local.pop("updated_sequences") / len(rollout)
    local["generate/tokens_per_s"] = rollout.n_tokens / max(phases.seconds["generate"], 1e-9)
    record = {"iteration": iteration + 1, **runtime.mean_over_ranks(local, run.device, run.distributed)}
    for key in filter(is_count, list(record)):
        record[key] = round(record[key] * run.distributed.world_size)
    if run.cfg.kl_target is not None:  # adaptive controller (Ziegler et al.), the same on every rank
        error = max(min(record["kl"] / run.cfg.kl_target - 1, 0.2), -0.2)
        run.kl_coef *= 1 + error * len(rollout) * run.distributed.world_size / run.cfg.kl_horizon
    record |= {"kl_coef": run.kl_coef}
    try:
        with phases("sync"):  # the engine samples the next iteration from the updated weights
            run.sampler.sync(run.policy)
    except EngineError as exc:  # the update is done: the checkpoint on the way out keeps it
        exc.updated, exc.record = True, record | phases.record()
        raise
    return record | phases.record() | {"seconds": time.time() - started}


# --------------------------------------------------------------------------------------------
# Saving.


def save(run: Run, iteration: int) -> None:
    """Checkpoint after ``iteration`` iterations. Gathering sharded weights and optimizer states is
    a collective: every rank takes part, rank 0 writes."""
    full = {name: runtime.full_state_dict(model) for name, model in run.trained.items()}
    optimizer_state = runtime.optimizer_state(run.trained, run.optimizer)
    if run.distributed.main:
        state = dict(iteration=iteration, kl_coef=run.kl_coef, config=asdict(run.cfg))
        state.update(
            optimizer=optimizer_state, scheduler=run.scheduler.state_dict(), rng=checkpoint.rng_state()
        )
        models = {"policy": runtime.unwrap(run.policy), "reference": run.reference,
                  "critic": runtime.unwrap(run.critic) if run.critic is not None else None}  # fmt: skip
        checkpoint.save_checkpoint(run.out, iteration, models, run.tokenizer, state, state_dicts=full)
        checkpoint.keep_newest(run.out, run.cfg.save_total_limit)
    if run.distributed.enabled:
        torch.distributed.barrier()


def stop_on_engine_error(run: Run, exc: EngineError, done: int, metrics, history: list) -> int:
    """Keep what the run has when its rollout engine fails: the failed iteration's metrics when its
    update was done, and a checkpoint there (one process: under torchrun the other ranks are not
    stopping with it, so the periodic checkpoints are what resume finds). Returns the iterations
    done and puts the checkpoint and the resume hint on ``exc``."""
    if exc.updated and exc.record is not None:
        history.append(exc.record)
        metrics.write(exc.record, step=done + 1)
        done += 1
    exc.checkpoint, exc.started = None, True
    if not run.distributed.enabled and done > run.start:
        save(run, done)
        exc.checkpoint = str(run.out / f"checkpoint-{done}")
    return done


def finish(run: Run, log, check: bool = True) -> None:
    if check and not run.cfg.fsdp:  # sharded weights differ across ranks by design
        for model in run.trained.values():
            runtime.check_in_sync(model, run.device, run.distributed)
        if run.distributed.enabled:
            log(f"rank {run.distributed.rank}: {run.distributed.world_size} ranks in sync")
    # DDP's reducer and FSDP's sharded parameters hold the process group: let them go first, so the
    # group is torn down below, with every rank present, and not by their destructors at
    # interpreter exit, when a peer may be gone and gloo's threads wait for it.
    if run.sampler is not None:
        run.sampler.close()
    run.policy = run.critic = run.reference = run.optimizer = run.scheduler = run.sampler = None
    gc.collect()
    runtime.finish_distributed(run.distributed)


@contextlib.contextmanager
def released_if_stopped_at_once(run: Run, log, *closing):
    """A run stopped at once (a second signal: ``errors.StoppedAtOnce``, or any KeyboardInterrupt)
    still closes ``closing`` (progress bar, metrics) and its rollout engine on the way out."""
    try:
        yield
    except KeyboardInterrupt:
        for thing in closing:
            thing.close()
        finish(run, log, check=False)
        raise


def say_skipped_updates(history: list[dict], log) -> None:
    """One line at the end of a run whose iterations had nothing left to update on (the
    ``skipped_update`` metric says which), instead of a warning each time."""
    skipped = sum(int(record.get("skipped_update", 0)) for record in history)
    if skipped:
        log(
            f"{skipped} of {len(history)} iterations had no sequence left for the update "
            "(all dropped by drop_truncated/dynamic_sampling)"
        )


def train(cfg: PPOConfig, log=print) -> list[dict]:
    """Run ``cfg``; returns the per-iteration metrics (also in output_dir/metrics.jsonl).

    SIGINT or SIGTERM (every rank gets it from a terminal's Ctrl-C or from torchrun) stops the run
    after the current iteration: all ranks save a checkpoint there, the plot is written, and
    ``errors.Interrupted`` is raised (the CLI prints how to resume and exits non-zero). A second
    signal in a single process stops it at once without saving the iteration under way
    (``errors.StoppedAtOnce``)."""
    run = set_up(cfg, log)
    history = []
    # A resumed run rewrites what the interrupted one logged after its checkpoint.
    metrics = MetricsWriter(
        run.out,
        enabled=run.distributed.main,
        log=log,
        resume_at=run.start if cfg.resume else None,
        report_to=cfg.report_to,
        config=asdict(cfg),
    )
    bar = tqdm(range(run.start, cfg.iterations), initial=run.start, total=cfg.iterations, desc=cfg.algo,
               disable=not run.distributed.main)  # fmt: skip
    signum, done = 0, run.start
    quiet = lambda *_: None  # noqa: E731
    stopping = runtime.StopOnSignal(
        log if run.distributed.main else quiet, repeat_stops=not run.distributed.enabled
    )
    with stopping as stop, released_if_stopped_at_once(run, log, bar, metrics):
        for iteration in bar:
            try:
                record = iterate(run, iteration)
            except EngineError as exc:
                done = stop_on_engine_error(run, exc, done, metrics, history)
                bar.close()
                metrics.close()
                finish(run, log, check=False)
                raise
            history.append(record)
            bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['kl']:.3f}",
                            time=timing.split_line(record))  # fmt: skip
            metrics.write(record, step=iteration + 1)
            done = iteration + 1
            signum = stop.requested(run.device, run.distributed)
            if signum or done == cfg.iterations or (cfg.save_every and done % cfg.save_every == 0):
                save(run, done)
            if signum:
                break
    bar.close()
    metrics.close()
    finish(run, log)
    if run.distributed.main:
        say_skipped_updates(history, log)
    if signum:
        name = signal.Signals(signum).name
        raise Interrupted(name, signum, done, str(run.out / f"checkpoint-{done}"))
    return history
