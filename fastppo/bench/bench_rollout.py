"""Rollout engines side by side: generated tokens per second of ``hf`` (transformers' generate) and
``vllm`` (a vLLM engine in this process) on the same random-weight model, prompts and settings.

    fastppo bench rollout                        # both models, B ∈ {32, 128}, 64 and 256 new tokens
    fastppo bench rollout --models tiny --engines hf,vllm --batches 32 --new_tokens 64 --output DIR

Models: ``tiny`` (the embedded default at vLLM's head size, 76 k parameters, vocabulary 32, here
with 512 positions) and
``0.5b`` (Qwen2-0.5B's architecture, 494 M parameters, random weights: bf16 on a GPU, fp32 on
CPU for both engines). Prompts are 64 random tokens; responses are sampled at temperature 1 and
may end early at EOS, so the rate counts the tokens actually generated. Each cell is timed once
after one warm-up call. ``vllm`` needs vLLM (the README's Rollout engines set-up); where it does not
import, its rows say so. Writes ``rollout-<device>-<date>.json`` and ``.md`` into ``--output``
(default ``./bench-results``; ``python -m bench rollout`` from the repository root: ``bench/results``).
"""

import argparse
import datetime
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from fastppo.bench.bench_ppo_step import qwen2_config
from fastppo.bench.run import device_name, git_commit
from fastppo.trainer import tiny
from fastppo.trainer.sampling import HFSampler, SamplingSettings

PROMPT_TOKENS = 64


def build_model(name: str, device):
    """(model, tokenizer or None, vocab, eos id) with random weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    if name == "tiny":  # positions for a 64-token prompt and 256 new tokens (RoPE: no parameters)
        tokenizer = tiny.build_tokenizer()
        config = tiny.model_config(tokenizer, head_dim=tiny.VLLM_HEAD_DIM)
        config.max_position_embeddings = 512
        return AutoModelForCausalLM.from_config(config), tokenizer
    model = AutoModelForCausalLM.from_config(qwen2_config(quick=False), dtype=torch.float32)
    return model, None


class _Ids:
    """A stand-in tokenizer for a model without one: pad and EOS ids only."""

    def __init__(self, config):
        self.pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
        self.eos_token_id = config.eos_token_id if isinstance(config.eos_token_id, int) else 0

    def save_pretrained(self, folder):  # vLLM needs a tokenizer in the folder: the tiny one serves
        tiny.build_tokenizer().save_pretrained(folder)


def prompts(batch: int, vocab: int, special: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(special, vocab, (batch, PROMPT_TOKENS), generator=g).tolist()


def measure(sampler, ids, new_tokens: int, device) -> dict:
    settings = SamplingSettings(max_new_tokens=new_tokens, temperature=1.0)
    sampler.generate(ids[:2], settings, device)  # warm-up
    start = time.perf_counter()
    out = sampler.generate(ids, settings, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    tokens = int(out.response_mask.sum())
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


def engine(name: str, model, tokenizer, folder: Path, device):
    if name == "hf":
        return HFSampler(model.to(device).eval(), tokenizer)
    from fastppo.trainer.sampling import vllm_engine

    llm = vllm_engine.start_llm(str(folder), gpu=device.type == "cuda", seed=0, gpu_memory_utilization=0.5)
    return vllm_engine.VLLMSampler(llm, tokenizer, verify_every=0, sleeps=False)


def sync_costs(sampler, model, model_name: str, repeats: int = 3) -> list[dict]:
    """Seconds of one sync (push and prefix-cache reset; the fingerprint timed apart) of the full
    weights, and of a LoRA policy (r = 16 on every linear layer: merge-and-push, W + B·A per layer)."""
    out = []
    for lora_r in (0, 16):
        policy = model
        if lora_r:
            from peft import LoraConfig, get_peft_model

            policy = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=32, target_modules="all-linear"))
        sampler.verify_every = 0
        push = min(_seconds(lambda p=policy: sampler.sync(p)) for _ in range(repeats))
        verify = min(_seconds(lambda p=policy: sampler.verify(p)) for _ in range(repeats))
        record = {"model": model_name, "lora_r": lora_r, "sync_seconds": push, "verify_seconds": verify}
        out.append(record)
        print(json.dumps(record))
        if lora_r:
            policy.unload()
    return out


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(args) -> dict:
    device = torch.device(args.device)
    records, skipped, syncs = [], [], []
    for model_name in args.models.split(","):
        model, tokenizer = build_model(model_name, device)
        tokenizer = tokenizer or _Ids(model.config)
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            for engine_name in args.engines.split(","):
                try:
                    sampler = engine(engine_name, model, tokenizer, Path(folder), device)
                except Exception as exc:  # vLLM not installed, or a model it cannot take
                    skipped.append({"model": model_name, "engine": engine_name, "reason": str(exc)[:300]})
                    print(f"{model_name} {engine_name}: skipped ({str(exc)[:200]})")
                    continue
                for batch in map(int, args.batches.split(",")):
                    ids = prompts(batch, model.config.vocab_size, 4)
                    for new_tokens in map(int, args.new_tokens.split(",")):
                        got = measure(sampler, ids, new_tokens, device)
                        record = {"model": model_name, "engine": engine_name, "batch": batch,
                                  "new_tokens": new_tokens, **got}  # fmt: skip
                        records.append(record)
                        print(json.dumps(record))
                if engine_name == "vllm":
                    syncs += sync_costs(sampler, model, model_name)
                sampler.close()
    return {
        "device": device_name(device), "torch": torch.__version__, "commit": git_commit(),
        "date": datetime.date.today().isoformat(), "prompt_tokens": PROMPT_TOKENS, "records": records,
        "syncs": syncs, "skipped": skipped,
    }  # fmt: skip


def table(result: dict) -> str:
    lines = ["| model | B | new tokens | engine | tokens/s | seconds |", "|---|---|---|---|---|---|"]
    for r in result["records"]:
        lines.append(f"| {r['model']} | {r['batch']} | {r['new_tokens']} | {r['engine']} | "
                     f"{r['tokens_per_s']:.0f} | {r['seconds']:.2f} |")  # fmt: skip
    lines += [
        f"| {s['model']} | | | {s['engine']} | skipped: {s['reason'][:80]} | |" for s in result["skipped"]
    ]
    if result["syncs"]:
        lines += [
            "",
            "| model | LoRA r | sync s (push, prefix-cache reset) | fingerprint check s |",
            "|---|---|---|---|",
        ]
        lines += [f"| {r['model']} | {r['lora_r']} | {r['sync_seconds']:.3f} | {r['verify_seconds']:.3f} |"
                  for r in result["syncs"]]  # fmt: skip
    return "\n".join(lines)


def main(argv=None, *, prog: str = "fastppo bench rollout", default_output: str = "bench-results") -> int:
    """Run the rollout benchmark; ``--output`` is a folder (or, ending in .json, the file itself)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,0.5b")
    parser.add_argument("--engines", default="hf,vllm")
    parser.add_argument("--batches", default="32,128")
    parser.add_argument("--new_tokens", default="64,256")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--output",
        default=default_output,
        help=f"folder for rollout-<device>-<date>.json and .md (default: {default_output})",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    result = run(args)
    out = Path(args.output)
    if out.suffix != ".json":
        out = out / f"rollout-{result['device']}-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(f"# Rollout engines, {result['device']}, {result['date']} "
                                      f"(commit {result['commit']})\n\n{table(result)}\n")  # fmt: skip
    print(table(result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
