"""``fastppo eval``: a policy on held-out prompts. Mean reward, KL to the reference, response
length, and diversity: distinct-1/2 (distinct n-grams over all n-grams of all responses) and the
repeated n-gram rate (the fraction of a response's 3-grams that already occurred in it).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import fastppo
from fastppo.trainer import runtime, tiny
from fastppo.trainer.rollout import generate, load_reward, to_padded, token_logprobs_of


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class EvalConfig:
    policy: str = _help("Folder of the policy to evaluate (e.g. a checkpoint's policy/).")
    reference: str | None = _help(
        "Folder of the reference for the KL (default: the checkpoint's reference/).", default=None
    )
    reward: str = _help("As in `fastppo train ppo --reward`.", default="echo")
    prompts: str | None = _help("JSONL with a 'prompt' per line (default: synthetic).", default=None)
    n_prompts: int = _help("Prompts to evaluate (synthetic ones are held out).", default=256)
    max_new_tokens: int = _help("Longest response.", default=8)
    temperature: float = _help("Sampling temperature (0: greedy).", default=1.0)
    batch_size: int = _help("Prompts per generation batch.", default=64)
    seed: int = _help("Seed (synthetic held-out prompts use it too).", default=1234)
    device: str = _help("'auto', 'cpu' or 'cuda[:i]'.", default="auto")
    output: str | None = _help("Also write the results to this JSON file.", default=None)

    def __post_init__(self):
        if not Path(self.policy).is_dir():
            raise ValueError(f"policy: no such folder: {self.policy}")
        if self.reference is None and (Path(self.policy).parent / "reference").is_dir():
            self.reference = str(Path(self.policy).parent / "reference")
        for name in ("n_prompts", "max_new_tokens", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


def distinct_n(responses: list[list[int]], n: int) -> float:
    grams = [tuple(r[i : i + n]) for r in responses for i in range(len(r) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_rate(responses: list[list[int]], n: int = 3) -> float:
    repeats = total = 0
    for r in responses:
        seen = set()
        for i in range(len(r) - n + 1):
            gram = tuple(r[i : i + n])
            repeats += gram in seen
            seen.add(gram)
            total += 1
    return repeats / total if total else 0.0


@torch.no_grad()
def evaluate(cfg: EvalConfig) -> dict:
    device = runtime.resolve_device(cfg.device)
    runtime.seed_everything(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.policy)
    policy = AutoModelForCausalLM.from_pretrained(cfg.policy).to(device).eval()
    reference = None
    if cfg.reference:
        reference = AutoModelForCausalLM.from_pretrained(cfg.reference).to(device).eval()
    if cfg.prompts:
        with open(cfg.prompts) as f:
            prompts = [json.loads(line)["prompt"] for line in f if line.strip()][: cfg.n_prompts]
    else:
        prompts = tiny.synthetic_prompts(cfg.n_prompts, cfg.seed)  # another seed than training's
    reward_fn = load_reward(cfg.reward, tokenizer)
    tau = cfg.temperature if cfg.temperature > 0 else 1.0
    scores, kls, lengths, responses = [], [], [], []
    for start in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[start : start + cfg.batch_size]
        samples = generate(policy, tokenizer, chunk, device, max_new_tokens=cfg.max_new_tokens,
                           temperature=cfg.temperature)  # fmt: skip
        mask = samples.response_mask
        scores += list(reward_fn(chunk, samples.texts))
        lengths += mask.sum(1).tolist()
        out = samples.sequences[:, -mask.shape[1] :]
        responses += [row[m].tolist() for row, m in zip(out, mask, strict=True)]
        if reference is not None:
            tokens = samples.tokens(padding_free=False)
            with runtime.autocast(device):
                logp, ref_logp = (
                    token_logprobs_of(m, tokens, temperature=tau)[0] for m in (policy, reference)
                )
            kl = fastppo.kl_penalty(to_padded(logp, mask), to_padded(ref_logp, mask), "k1")
            kls += kl.sum(1).tolist()
    result = {
        "prompts": len(prompts),
        "reward": sum(scores) / len(scores),
        "kl_to_reference": sum(kls) / len(kls) if kls else None,
        "response_length": sum(lengths) / len(lengths),
        "distinct_1": distinct_n(responses, 1),
        "distinct_2": distinct_n(responses, 2),
        "repeated_3gram_rate": repeated_ngram_rate(responses, 3),
    }
    if cfg.output:
        Path(cfg.output).write_text(json.dumps(result, indent=1) + "\n")
    return result
