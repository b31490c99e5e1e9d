"""``fastppo eval``: a policy on held-out prompts, alone or beside a baseline (typically its starting
point): mean reward, KL to the reference, response length, and diversity: distinct-1/2 (distinct
n-grams over all n-grams of all responses) and the repeated n-gram rate (the fraction of a
response's 3-grams that already occurred in it).

With ``--baseline`` both models answer the same N prompts, each sampled after seeding with the same
``--seed``, so the comparison is paired: the reward difference A − B is the mean of the per-prompt
differences, with the standard error of that mean, and the win rate of A over B is the fraction of
prompts where A's response scores higher than B's (ties count half). A model against itself gives
a difference of exactly 0 and a win rate of exactly 0.5.

    prompts, runs = sample(cfg)          {"policy": Responses, "baseline": Responses}, per prompt
    result = summarize(runs)             the JSON: one model's metrics, or both and the comparison
    format_table(result), plot_comparison(runs, result, png)
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

import fastppo
from fastppo.trainer import checkpoint, hub, lora, runtime, sampling, tiny
from fastppo.trainer.config import DataFields, RewardFields, check_engine_fields
from fastppo.trainer.data import PromptRows, check_chat_template, read_prompt_rows
from fastppo.trainer.errors import EngineError, UsageError
from fastppo.trainer.hub import check_model
from fastppo.trainer.passes import token_logprobs_of
from fastppo.trainer.rewards import Rewards, check_reward_fields, load_rewards
from fastppo.trainer.sources import Source, check_source


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class EvalConfig(DataFields, RewardFields):
    """``fastppo eval``: what to evaluate, on which prompts, scored how (the data and reward fields are
    training's)."""

    policy: str | None = field(
        default=None,
        metadata={
            "required": True,
            "help": (
                "The policy to evaluate, A: a folder (a run folder, a checkpoint's policy/) or a model id."
            ),
        },
    )
    baseline: str | None = _help(
        "A model to put beside it, B (e.g. its starting point, the checkpoint's reference/): both "
        "answer the same prompts with the same sampling seed; the table adds A − B and A's win rate.",
        default=None,
    )
    reference: str | None = _help(
        "The reference of the KL, for both models (default: the reference/ folder beside --policy's, "
        "else beside --baseline's; none there: no KL).",
        default=None,
    )
    prompts: str | None = _help(
        "The prompts, as in training (alias --data): a JSONL, JSON, CSV or Parquet file, a save_to_disk "
        "folder or a Hugging Face dataset id (default: synthetic held-out).",
        default=None,
    )
    n_prompts: int = _help("Prompts to evaluate (the first N of --prompts).", default=256)
    max_new_tokens: int = _help("Longest response.", default=8)
    temperature: float = _help("Sampling temperature (0: greedy).", default=1.0)
    batch_size: int = _help("Prompts per generation batch.", default=64)
    seed: int = _help("Seed of the sampling, the same for both models (synthetic prompts use it too).",
                      default=1234)  # fmt: skip
    device: str = _help("'auto', 'cpu' or 'cuda[:i]'.", default="auto")
    rollout_engine: str = _help(
        "What samples the responses, as in training: 'hf', 'vllm' (one engine in this process for "
        "every model: each model's weights are pushed into it, verified, before it answers) or "
        "'vllm-server' (a `fastppo vllm-serve` server at --vllm_server_url, fed the same way).",
        default="hf",
    )
    vllm_server_url: str | None = _help(
        "With rollout_engine vllm-server: the server's address.", default=None
    )
    vllm_gpu_memory_utilization: float = _help(
        "With rollout_engine vllm on a GPU: the fraction of its memory the engine may take.", default=0.3
    )
    output: str | None = _help("Also write the results to this JSON file.", default=None)
    plot: str | None = _help(
        "Draw the metrics into this PNG (needs matplotlib; default: --output with .png, if given; "
        "'none': no plot).",
        default=None,
    )

    def __post_init__(self):
        """Every mistake is a ``UsageError`` naming the field, as training's config does."""
        for name in ("policy", "baseline", "reference"):
            if getattr(self, name) is not None:
                setattr(self, name, newest_checkpoint_model(getattr(self, name), name))
                check_model(getattr(self, name), name)  # a model folder or a Hugging Face id
        if self.reference is None:
            folders = [Path(p) for p in (self.policy, self.baseline) if p is not None and Path(p).is_dir()]
            self.reference = next((str(p.parent / "reference") for p in folders
                                   if (p.parent / "reference").is_dir()), None)  # fmt: skip
        if self.prompts is not None:
            check_source(Source.of(self, "prompts"))  # a file, a dataset folder or a dataset id
        check_reward_fields(self)
        for name in ("n_prompts", "max_new_tokens", "batch_size"):
            if getattr(self, name) <= 0:
                raise UsageError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.temperature < 0:
            raise UsageError(f"temperature must be >= 0, got {self.temperature}")
        check_engine_fields(self.rollout_engine, self.vllm_server_url, self.vllm_gpu_memory_utilization)
        if self.plot is None and self.output is not None:
            self.plot = str(Path(self.output).with_suffix(".png"))
        if self.plot is not None and self.plot.lower() in ("", "none"):
            self.plot = None


def newest_checkpoint_model(path: str, name: str) -> str:
    """A run folder (``fastppo train``'s output_dir: checkpoints, no weights of its own) stands for
    its newest checkpoint's ``policy/`` (its ``reference/`` for ``--reference``); anything else is
    as given."""
    folder = Path(path)
    if not folder.is_dir() or any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")):
        return path
    newest = checkpoint.latest_checkpoint(folder)
    if newest is None:
        return path  # check_model says what the folder lacks
    return str(newest / ("reference" if name == "reference" else "policy"))


# --------------------------------------------------------------------------------------------
# Metrics.


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


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def stderr(values: list[float]) -> float:
    """Standard error of the mean of ``values`` (N,): sample standard deviation / √N; 0 for N < 2."""
    if len(values) < 2:
        return 0.0
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values))


def win_rate(a: list[float], b: list[float]) -> float:
    """Fraction of prompts where ``a`` (N,) beats ``b`` (N,), ties counted half."""
    return mean([1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b, strict=True)])


@dataclass
class Responses:
    """One model's responses to the N prompts, in prompt order."""

    texts: list[str]  # (N,) decoded responses
    tokens: list[list[int]]  # (N, ragged) response token ids, up to and including EOS
    scores: list[float]  # (N,) reward of each response
    kls: list[float] | None  # (N,) k1 KL to the reference summed over the response; None without one
    parts: dict[str, list[float]] = field(default_factory=dict)  # each reward's (N,) scores, by name

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.tokens]


#: The metrics of one model, in table order: JSON key → table label.
METRICS = {
    "reward": "mean reward",
    "kl_to_reference": "KL to reference",
    "response_length": "response length",
    "distinct_1": "distinct-1",
    "distinct_2": "distinct-2",
    "repeated_3gram_rate": "repeated 3-gram rate",
}


def summary(run: Responses) -> dict:
    """One model's metrics: the keys of ``METRICS``, ``prompts``, ``reward_stderr`` and each
    reward's mean as ``reward/<name>`` (see ``part_keys``)."""
    return {
        "prompts": len(run.scores),
        "reward": mean(run.scores),
        "reward_stderr": stderr(run.scores),
        "kl_to_reference": mean(run.kls) if run.kls else None,
        "response_length": mean(run.lengths),
        "distinct_1": distinct_n(run.tokens, 1),
        "distinct_2": distinct_n(run.tokens, 2),
        "repeated_3gram_rate": repeated_ngram_rate(run.tokens, 3),
    } | {f"reward/{name}": mean(values) for name, values in run.parts.items()}


def part_keys(result: dict) -> list[str]:
    """The per-reward keys of a ``summary``: ``reward/<name>``, in --reward's order."""
    return [k for k in result if k.startswith("reward/")]


def summarize(runs: dict[str, Responses]) -> dict:
    """The JSON of ``fastppo eval``. One model (``runs`` holds "policy" only): its ``summary``.
    Two: {"policy": summary, "baseline": summary, "difference": A − B of every metric (None where
    either lacks it) and ``reward_stderr``, the standard error of the paired reward difference,
    "win_rate": A over B under the reward}."""
    a = summary(runs["policy"])
    if "baseline" not in runs:
        return a
    b = summary(runs["baseline"])
    scores_a, scores_b = runs["policy"].scores, runs["baseline"].scores
    difference = {k: None if a[k] is None or b[k] is None else a[k] - b[k] for k in [*METRICS, *part_keys(a)]}
    difference["reward_stderr"] = stderr([x - y for x, y in zip(scores_a, scores_b, strict=True)])
    return {"policy": a, "baseline": b, "difference": difference, "win_rate": win_rate(scores_a, scores_b)}


# --------------------------------------------------------------------------------------------
# Sampling.


def load_model(arg: str, path: str, device: torch.device):
    """(tokenizer, causal LM in eval mode on ``device``) from ``path`` (a folder or a model id),
    given as the field ``arg``; one that does not load is a ``UsageError`` naming it."""
    try:
        tokenizer = hub.load_tokenizer(path)
        model = lora.load_causal_lm(path)  # a LoRA adapter folder: on the reference/ (base) beside it
    except (OSError, ValueError) as exc:
        raise UsageError(f"{arg}: cannot load {path} ({str(exc).strip().splitlines()[0]})") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model.to(device).eval()


def load_prompts(cfg: EvalConfig) -> PromptRows:
    """The first ``n_prompts`` rows of ``--prompts`` (any source training reads), or synthetic
    prompts of the echo task drawn with the eval seed (training draws with its own)."""
    if cfg.prompts is None:
        return PromptRows(tiny.synthetic_prompts(cfg.n_prompts, cfg.seed))
    rows = read_prompt_rows(Source.of(cfg, "prompts"), cfg.prompt_column)
    return PromptRows(*rows.take(list(range(min(cfg.n_prompts, len(rows))))))


def start_engine(cfg: EvalConfig, path: str, tokenizer, device: torch.device, log) -> sampling.Sampler:
    """The engine ``cfg.rollout_engine`` names, for every model of this evaluation: vLLM in this
    process, built from ``path`` (an adapter's base for a LoRA folder), or the server's client."""
    if cfg.rollout_engine == "vllm":
        from fastppo.trainer.sampling import vllm_engine

        source = lora.adapter_base(path) if lora.is_adapter_folder(path) else path
        llm = vllm_engine.start_llm(source, gpu=device.type == "cuda", seed=cfg.seed,
                                    gpu_memory_utilization=cfg.vllm_gpu_memory_utilization)  # fmt: skip
        log(f"rollout engine: vLLM {vllm_engine.vllm_version()} from {source}")
        return vllm_engine.VLLMSampler(llm, tokenizer, verify_every=1, sleeps=False, log=log)
    from fastppo.trainer.sampling import vllm_server

    # The server reads each model's weights from this folder: the same machine or a shared filesystem.
    sync_dir = Path(cfg.output).resolve().parent if cfg.output else Path.cwd()
    return vllm_server.connect(cfg.vllm_server_url, tokenizer, sync_dir / "rollout-sync-eval", verify_every=1,
                               log=log)  # fmt: skip


def engine_serving(engine: sampling.Sampler, arg: str, model) -> sampling.Sampler:
    """``engine`` holding ``model``'s weights (pushed and verified); another architecture or
    vocabulary than the engine's is a ``UsageError`` naming ``arg``."""
    try:
        engine.check_identity(model)  # every model's, not only the first one's
        engine.sync(model)
    except EngineError as exc:
        raise UsageError(f"{arg}: {exc}") from None
    return engine


@torch.no_grad()
def respond(
    sampler, model, tokenizer, prompts: PromptRows, reward: Rewards, reference, cfg: EvalConfig, device
) -> Responses:
    """``model``'s responses to ``prompts`` (N rows), drawn by ``sampler`` (which samples ``model``)
    after seeding with ``cfg.seed``, scored by ``reward`` (given the rows' columns) and, when
    ``reference`` is given, their KL to it."""
    runtime.seed_everything(cfg.seed)  # the same draws for every model: a paired comparison
    tau = cfg.temperature if cfg.temperature > 0 else 1.0
    settings = sampling.SamplingSettings(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
    run = Responses([], [], [], [] if reference is not None else None)
    for start in range(0, len(prompts), cfg.batch_size):
        chunk, columns = prompts.take(list(range(start, min(start + cfg.batch_size, len(prompts)))))
        samples = sampling.sample(sampler, tokenizer, chunk, settings, device)
        run.texts += samples.texts
        columns["completion_ids"] = samples.response_ids()
        scored = reward(chunk, samples.texts, columns)
        run.scores += scored.values
        for name, part in scored.parts.items():
            run.parts.setdefault(name, []).extend(part.values)
        run.tokens += columns["completion_ids"]
        if reference is not None:
            tokens = samples.tokens(padding_free=False)
            with runtime.autocast(device):
                logp, ref_logp = (
                    token_logprobs_of(m, tokens, temperature=tau)[0] for m in (model, reference)
                )
            run.kls += tokens.row_sums(fastppo.kl_penalty(logp, ref_logp, "k1")).tolist()  # (B,) sums
    return run


def sample(cfg: EvalConfig, log=lambda message: None) -> tuple[list[str], dict[str, Responses]]:
    """The prompts (N,) and the per-prompt responses of "policy" (and "baseline" when given). The
    models are loaded one at a time beside the reference; the reward takes the policy's tokenizer.
    With a vLLM engine, one engine answers for both models, each pushed into it in its turn."""
    device = runtime.resolve_device(cfg.device)
    prompts = load_prompts(cfg)
    reference = None
    if cfg.reference:
        reference = load_model("reference", cfg.reference, device)[1]
    runs, reward, engine = {}, None, None
    try:
        for arg in ("policy", "baseline"):
            path = getattr(cfg, arg)
            if path is None:
                continue
            tokenizer, model = load_model(arg, path, device)
            check_chat_template(tokenizer, prompts.prompts[:16], arg)
            if reference is not None and reference.config.vocab_size != model.config.vocab_size:
                raise UsageError(f"reference: a vocabulary of {reference.config.vocab_size} tokens, "
                                 f"{arg} has {model.config.vocab_size}")  # fmt: skip
            reward = reward or load_rewards(cfg, tokenizer, device)
            if cfg.rollout_engine == "hf":
                sampler = sampling.HFSampler(model, tokenizer)
            else:
                engine = engine or start_engine(cfg, path, tokenizer, device, log)
                sampler = engine_serving(engine, arg, model)
            runs[arg] = respond(sampler, model, tokenizer, prompts, reward, reference, cfg, device)
            del model, sampler
    finally:
        if engine is not None:
            engine.close()
    return prompts.prompts, runs


def evaluate(cfg: EvalConfig, log=lambda message: None) -> dict:
    """Sample, summarize (see ``summarize``) and write ``cfg.output`` and ``cfg.plot`` when set."""
    _, runs = sample(cfg, log)
    result = summarize(runs)
    if cfg.output:
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.output).write_text(json.dumps(result, indent=1) + "\n")
        log(f"wrote {cfg.output}")
    if cfg.plot:
        Path(cfg.plot).parent.mkdir(parents=True, exist_ok=True)
        written = plot_comparison(runs, result, cfg.plot, {"A": cfg.policy, "B": cfg.baseline})
        log(
            f"wrote {cfg.plot}"
            if written
            else "no plot: matplotlib is not installed (pip install matplotlib)"
        )
    return result


# --------------------------------------------------------------------------------------------
# The table and the plot.


def _number(value, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    value = round(value, 3) + 0.0  # no "-0.000"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def format_table(result: dict) -> str:
    """Plain text, one row per metric; columns A and, with a baseline, B and A − B (the reward
    difference with its standard error, then the win rate of A over B)."""
    paired = "difference" in result
    a = result["policy"] if paired else result
    b, diff = (result["baseline"], result["difference"]) if paired else ({}, {})
    rows = [("metric", "A", "B", "A − B"), ("prompts", str(a["prompts"]), str(b.get("prompts", "")), "")]
    for key, label in METRICS.items():
        delta = _number(diff.get(key), signed=True) if paired else ""
        if key == "reward":
            label = "mean reward (± s.e.)"
            a_cell = f"{_number(a[key])} ± {a['reward_stderr']:.3f}"
            b_cell = f"{_number(b[key])} ± {b['reward_stderr']:.3f}" if paired else ""
            delta += f" ± {diff['reward_stderr']:.3f}" if paired else ""
            rows.append((label, a_cell, b_cell, delta))
            for part in part_keys(a):  # each reward's mean, under the (weighted) total
                rows.append((f"  {part}", _number(a[part]), _number(b.get(part)) if paired else "",
                             _number(diff.get(part), signed=True) if paired else ""))  # fmt: skip
            if paired:
                rows.append(("win rate of A over B", "", "", f"{result['win_rate']:.3f}"))
            continue
        rows.append((label, _number(a[key]), _number(b.get(key)) if paired else "", delta))
    if not paired:
        rows = [row[:2] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                       enumerate(zip(row, widths, strict=True))).rstrip() for row in rows]  # fmt: skip
    return "\n".join(lines)


COLORS = {"A": "tab:blue", "B": "tab:orange"}


def _per_prompt_panel(ax, title: str, values: dict[str, list[float]]) -> None:
    """One bar per model ("A", "B"): the mean of its per-prompt ``values`` (N,), ± standard error."""
    names = list(values)
    ax.bar(names, [mean(v) for v in values.values()], yerr=[stderr(v) for v in values.values()],
           color=[COLORS[n] for n in names], width=0.6, capsize=5)  # fmt: skip
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")


def _diversity_panel(ax, models: dict[str, Responses]) -> None:
    """distinct-1, distinct-2 and the repeated 3-gram rate, one bar per model in each group."""
    width = 0.8 / len(models)
    for i, (name, run) in enumerate(models.items()):
        s = summary(run)
        values = [s["distinct_1"], s["distinct_2"], s["repeated_3gram_rate"]]
        ax.bar([j + (i - (len(models) - 1) / 2) * width for j in range(3)], values, width=width,
               color=COLORS[name], label=name)  # fmt: skip
    ax.set_xticks(range(3), ["distinct-1", "distinct-2", "repeated 3-gram"])
    ax.set_ylim(0, 1)
    ax.set_title("diversity")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()


def plot_comparison(
    runs: dict[str, Responses], result: dict, png: str | Path, labels: dict[str, str] | None = None
) -> Path | None:
    """A PNG of the metrics, A (and B) side by side: mean reward, length and KL with their standard
    errors, the diversity metrics, and with a baseline a histogram of the per-prompt reward
    differences A − B. ``labels``: what A and B are, for the title. None (nothing written) when
    matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    models = {"A": runs["policy"]} | ({"B": runs["baseline"]} if "baseline" in runs else {})
    panels = {"mean reward": [r.scores for r in models.values()],
              "response length (tokens)": [r.lengths for r in models.values()]}  # fmt: skip
    if runs["policy"].kls is not None:
        panels["KL to reference"] = [r.kls for r in models.values()]
    count = len(panels) + 1 + ("B" in models)
    cols = 2 if count == 4 else min(3, count)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.3 * rows), squeeze=False)
    axes = list(axes.flat)
    for ax, (title, values) in zip(axes, panels.items(), strict=False):
        _per_prompt_panel(ax, title, dict(zip(models, values, strict=True)))
    _diversity_panel(axes[len(panels)], models)
    if "B" in models:
        ax = axes[len(panels) + 1]
        differences = [x - y for x, y in zip(runs["policy"].scores, runs["baseline"].scores, strict=True)]
        ax.hist(differences, bins=21, color="tab:gray")
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_title(f"reward A − B per prompt\nwin rate of A {result['win_rate']:.3f}")
        ax.set_xlabel("A − B")
    for ax in axes[count:]:
        ax.axis("off")
    if labels:
        fig.suptitle("   ".join(f"{k}: {v}" for k, v in labels.items() if v), fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return Path(png)
