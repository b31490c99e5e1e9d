"""The offline loops: SFT (response-only loss), reward model (pairwise loss) and DPO.

Each is a loss on a batch of rows plus the same small fit loop: shuffled batches, AdamW, a
transformers scheduler, gradient clipping, non-finite steps skipped and counted, metrics per
step to ``metrics.jsonl``, held-out evaluation after every epoch, an atomic checkpoint at the end.
"""

import copy
import functools
import json
import math
import random
import signal
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    get_scheduler,
)

import fastppo
from fastppo.trainer import checkpoint, data, hub, loading, lora, runtime, tiny
from fastppo.trainer.config import DPOConfig, OfflineConfig, RMConfig, SFTConfig
from fastppo.trainer.errors import Interrupted
from fastppo.trainer.layout import TokenBatch
from fastppo.trainer.metrics import MetricsWriter
from fastppo.trainer.passes import token_logprobs_of
from fastppo.trainer.sources import Source


def load_tokenizer(cfg: OfflineConfig):
    tokenizer = tiny.build_tokenizer() if cfg.model is None else hub.load_tokenizer(cfg.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def attention(cfg: OfflineConfig) -> str:
    return runtime.attention_implementation(cfg.attention, runtime.resolve_device(cfg.device))


def load_causal_lm(cfg: OfflineConfig, tokenizer):
    """The model to train: with ``lora_r`` > 0 a peft model (LoRA adapter, base frozen); with
    ``gradient_checkpointing``, checkpointed."""
    if cfg.model is None:
        model = tiny.build_policy(tokenizer, cfg.seed, attention(cfg))
    else:
        model = AutoModelForCausalLM.from_pretrained(cfg.model, attn_implementation=attention(cfg))
    return lora.prepare(model, cfg)


def sequence_logprobs(
    model, batch: dict, padding_free: bool | None = None, fused: bool = True
) -> torch.Tensor:
    """(B,) log-probability of each row's response tokens (``labels`` != -100): a sum of token
    log-probs, through the loops' one model-to-log-probs path (``passes.token_logprobs_of``).

    ``padding_free`` (default: when the model runs flash-attn's ``flash_attention_2``) packs the
    rows' real tokens into one row, position ids restarting at each sequence, so that no compute
    goes to padding.
    """
    if padding_free is None:
        padding_free = runtime.varlen_attention(runtime.unwrap(model).config._attn_implementation)
    # Each position's label is the next token's, -100 past the end of its row (and on padding).
    next_labels = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    tokens = TokenBatch.build(
        batch["input_ids"], batch["attention_mask"], next_labels, padding_free=padding_free
    )
    logp, _ = token_logprobs_of(model, tokens, temperature=1.0, fused=fused)
    return tokens.row_sums(logp)


# --------------------------------------------------------------------------------------------
# The three losses: (model, rows) -> (loss, metrics of 0-d tensors).


def on(device, batch: dict) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def sft_loss(model, tokenizer, rows, device, fused: bool = True):
    batch = on(device, data.encode(tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows]))
    n_tokens = (batch["labels"][:, 1:] != -100).sum().clamp(min=1)
    loss = -sequence_logprobs(model, batch, fused=fused).sum() / n_tokens  # mean NLL per response token
    return loss, {"loss": loss.detach(), "perplexity": loss.detach().exp()}


def pair_batches(tokenizer, rows, device):
    prompts = [r["prompt"] for r in rows]
    chosen = data.encode(tokenizer, prompts, [r["chosen"] for r in rows])
    rejected = data.encode(tokenizer, prompts, [r["rejected"] for r in rows])
    return on(device, chosen), on(device, rejected)


def reward_model_loss(model, tokenizer, rows, device):
    chosen, rejected = pair_batches(tokenizer, rows, device)
    score = lambda b: model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, 0].float()  # noqa: E731
    margin = score(chosen) - score(rejected)
    loss = -torch.nn.functional.logsigmoid(margin).mean()
    return loss, {
        "loss": loss.detach(),
        "accuracy": (margin > 0).float().mean(),
        "margin": margin.detach().mean(),
    }


def make_dpo_loss(cfg: DPOConfig, reference):
    def dpo_loss(model, tokenizer, rows, device):
        chosen, rejected = pair_batches(tokenizer, rows, device)
        with torch.no_grad():  # reference log-probs: once per batch, no graph
            ref_chosen, ref_rejected = (
                sequence_logprobs(reference, chosen, fused=cfg.fused_lm_head),
                sequence_logprobs(reference, rejected, fused=cfg.fused_lm_head),
            )
        loss, chosen_rewards, rejected_rewards = fastppo.dpo_loss(
            sequence_logprobs(model, chosen, fused=cfg.fused_lm_head),
            sequence_logprobs(model, rejected, fused=cfg.fused_lm_head), ref_chosen, ref_rejected,
            beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
        )  # fmt: skip
        margin = chosen_rewards - rejected_rewards
        return loss, {
            "loss": loss.detach(), "accuracy": (margin > 0).float().mean(), "margin": margin.mean(),
            "chosen_reward": chosen_rewards.mean(), "rejected_reward": rejected_rewards.mean(),
        }  # fmt: skip

    return dpo_loss


# --------------------------------------------------------------------------------------------
# The fit loop.


@torch.no_grad()
def evaluate(model, tokenizer, rows, loss_fn, batch_size, device) -> dict:
    model.eval()
    totals: dict[str, float] = {}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        with runtime.autocast(device):
            _, metrics = loss_fn(model, tokenizer, chunk, device)
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + float(v) * len(chunk)
    return {f"eval_{k}": v / len(rows) for k, v in totals.items()}


def fit(cfg: OfflineConfig, name: str, model, tokenizer, rows, loss_fn, log=print) -> list[dict]:
    """Train ``model`` on ``rows`` with ``loss_fn``; a checkpoint after every epoch, and with
    ``cfg.resume`` a restart from the latest one continues exactly where it stopped.

    SIGINT or SIGTERM stops after the current step with a checkpoint there (the epoch's batch order
    and how many batches it has done, so a resume goes on mid-epoch) and ``errors.Interrupted``."""
    device = runtime.resolve_device(cfg.device)
    runtime.seed_everything(cfg.seed)
    model = model.to(device)
    out = Path(cfg.output_dir)
    checkpoint.claim_run_folder(out, resume=cfg.resume, overwrite=cfg.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1) + "\n")
    folder = "reward_model" if name == "rm" else "policy"
    train_rows, eval_rows = data.split(rows, cfg.eval_fraction, cfg.seed)
    optimizer = torch.optim.AdamW(lora.trainable_parameters(model), lr=cfg.lr, weight_decay=0.0)
    total_steps = cfg.epochs * math.ceil(len(train_rows) / cfg.batch_size)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=total_steps)  # fmt: skip
    order_rng = random.Random(cfg.seed)  # the order of the batches
    history, nonfinite = [], runtime.NonFiniteSteps(cfg.max_nonfinite_steps)
    last, step, first_epoch, skip = resume_fit(cfg, out, model, folder, optimizer, scheduler, order_rng, log)

    def save(epoch: int, batches_done: int, epoch_order) -> None:
        """A checkpoint at ``step``: continue with epoch ``epoch`` (0-based), whose batch order
        ``epoch_order`` (order_rng's state before its shuffle) has ``batches_done`` behind it."""
        state = dict(
            step=step, epoch=epoch, batches_done=batches_done, config=asdict(cfg), order_rng=epoch_order
        )
        state.update(
            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), rng=checkpoint.rng_state()
        )
        checkpoint.save_checkpoint(out, step, {folder: model}, tokenizer, state)
        checkpoint.keep_newest(out, cfg.save_total_limit)

    metrics = MetricsWriter(out, log=log, report_to=cfg.report_to, config=asdict(cfg),
                            resume_at=step if last is not None else None, key="step")  # fmt: skip
    signum = 0
    with tqdm(total=total_steps, initial=step, desc=name) as bar, runtime.StopOnSignal(log) as stop:
        for epoch in range(first_epoch, cfg.epochs):
            epoch_order = order_rng.getstate()
            for done, rows_batch in enumerate(data.batches(train_rows, cfg.batch_size, order_rng), 1):
                if done <= skip:  # resumed mid-epoch: these batches were trained on before the stop
                    continue
                step += 1
                bar.update(1)
                record = train_step(cfg, model, tokenizer, rows_batch, loss_fn, optimizer, scheduler, device)
                if not nonfinite.ok(record is not None, f"{name} step {step}"):
                    continue
                record = {"step": step, "epoch": epoch + 1, **record}
                bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k in ("loss", "accuracy")})
                history.append(record)
                metrics.write(record, step)
                signum = stop.received
                if signum:
                    save(epoch, done, epoch_order)
                    break
            if signum:
                break
            skip = 0
            if eval_rows:
                held_out = evaluate(model, tokenizer, eval_rows, loss_fn, cfg.batch_size, device)
                log(f"{name} epoch {epoch + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in held_out.items()))
                history.append({"step": step, "epoch": epoch + 1, **held_out})
                metrics.write(history[-1], step)
            save(epoch + 1, 0, order_rng.getstate())
    metrics.close()
    if signum:
        name_of = signal.Signals(signum).name
        raise Interrupted(name_of, signum, step, str(out / f"checkpoint-{step}"))
    return history


def resume_fit(cfg: OfflineConfig, out: Path, model, folder: str, optimizer, scheduler, order_rng, log):
    """With ``cfg.resume``, the latest checkpoint in ``out`` loaded into ``model`` (its ``folder``),
    the optimizer, the scheduler and the random states. Returns (that checkpoint or None, its step,
    the epoch to continue with, and how many of that epoch's batches are done)."""
    last = checkpoint.latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and last is None:
        log(f"resume: no checkpoint in {out}, starting from scratch")
    if last is None:
        return None, 0, 0, 0
    if lora.is_peft(model):
        lora.load_adapter(model, last / folder)
    else:
        model.load_state_dict(type(model).from_pretrained(last / folder).state_dict())
    state = checkpoint.load_trainer_state(last)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    checkpoint.set_rng_state(state["rng"])
    order_rng.setstate(state["order_rng"])
    log(f"resumed from {last} at step {state['step']}")
    return last, state["step"], state["epoch"], state.get("batches_done", 0)


def train_step(cfg, model, tokenizer, rows_batch, loss_fn, optimizer, scheduler, device) -> dict | None:
    """One optimizer step on ``rows_batch``: its metrics, or None when the loss or the gradient is
    not finite (the step is skipped)."""
    model.train()
    with runtime.autocast(device):
        loss, batch_metrics = loss_fn(model, tokenizer, rows_batch, device)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    if not bool(torch.isfinite(loss) and torch.isfinite(grad_norm)):
        return None
    optimizer.step()
    scheduler.step()
    return {k: float(v) for k, v in batch_metrics.items()}


def read_data(cfg: OfflineConfig, fields: tuple[str, ...], tokenizer) -> list[dict]:
    """``--data``'s rows whole (they are shuffled in memory), each with ``fields``; chat-message
    prompts need the tokenizer's chat template (checked on the first rows)."""
    rows = data.read_rows(Source.of(cfg, "data"), fields, prompt_column=cfg.prompt_column)
    data.check_chat_template(tokenizer, [row["prompt"] for row in rows[:16]], "model")
    return rows


def train_sft(cfg: SFTConfig, log=print) -> list[dict]:
    tokenizer = load_tokenizer(cfg)
    rows = (
        read_data(cfg, ("prompt", "response"), tokenizer)
        if cfg.data
        else data.synthetic_sft(cfg.n_synthetic, cfg.seed)
    )
    loss = functools.partial(sft_loss, fused=cfg.fused_lm_head)
    return fit(cfg, "sft", load_causal_lm(cfg, tokenizer), tokenizer, rows, loss, log)


def train_reward_model(cfg: RMConfig, log=print) -> list[dict]:
    tokenizer = load_tokenizer(cfg)
    if cfg.model is None:
        config = tiny.model_config(tokenizer)
        config.num_labels = 1
        torch.manual_seed(cfg.seed)
        model = AutoModelForSequenceClassification.from_config(config, attn_implementation=attention(cfg))
    else:
        model = loading.from_pretrained_with_new_head(
            AutoModelForSequenceClassification, cfg.model, "reward model", log, head="score head",
            num_labels=1, attn_implementation=attention(cfg),
        )  # fmt: skip
    model.config.pad_token_id = tokenizer.pad_token_id  # scores are read at the last real token
    model = lora.prepare(model, cfg, task_type="SEQ_CLS")  # LoRA: the score head trains in full
    fields = ("prompt", "chosen", "rejected")
    rows = read_data(cfg, fields, tokenizer) if cfg.data else data.synthetic_pairs(cfg.n_synthetic, cfg.seed)
    return fit(cfg, "rm", model, tokenizer, rows, reward_model_loss, log)


def train_dpo(cfg: DPOConfig, log=print) -> list[dict]:
    tokenizer = load_tokenizer(cfg)
    policy = load_causal_lm(cfg, tokenizer)
    if lora.is_peft(policy):  # the base model: the policy with its adapter disabled, no copy
        reference = lora.AdapterDisabled(policy)
    else:
        reference = copy.deepcopy(policy).eval().requires_grad_(False).to(runtime.resolve_device(cfg.device))
    fields = ("prompt", "chosen", "rejected")
    rows = read_data(cfg, fields, tokenizer) if cfg.data else data.synthetic_pairs(cfg.n_synthetic, cfg.seed)
    return fit(cfg, "dpo", policy, tokenizer, rows, make_dpo_loss(cfg, reference), log)
