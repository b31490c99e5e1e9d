"""The ``vllm-server`` rollout engine: ``fastppo vllm-serve`` started here on 127.0.0.1 (and
stopped by the tests, within bounded time), a run that learns through it as the in-process engine
does, the verified sync over HTTP, and each way a server can fail a run: unreachable, another
model, gone mid-run (a checkpoint is saved first, and the run says how to resume).

Needs vLLM (the README's Rollout engines set-up); skipped with that reason without it.
"""

import json
import signal
import socket
import time
import urllib.request

import pytest

pytest.importorskip(
    "vllm", reason="vLLM is not installed (README: Rollout engines; CI runs these in .venv-vllm)"
)

import processes  # noqa: E402
import torch  # noqa: E402

from fastppo.trainer import passes, tiny  # noqa: E402
from fastppo.trainer.errors import EngineError  # noqa: E402
from fastppo.trainer.sampling import SamplingSettings, sample  # noqa: E402
from fastppo.trainer.sampling.vllm_server import ServerSampler  # noqa: E402

ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
pytestmark = pytest.mark.usefixtures("loop_backend")  # the runs take the reference path, as in test_trainer
START_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_folder(folder, vocab_size=None):
    tokenizer = tiny.build_tokenizer()
    policy = tiny.build_policy(tokenizer, seed=0, head_dim=tiny.VLLM_HEAD_DIM)
    if vocab_size is not None:
        policy.resize_token_embeddings(vocab_size)
    policy.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class Server:
    """``fastppo vllm-serve`` on 127.0.0.1 in its own process group; ``stop`` ends it."""

    def __init__(self, model, cwd):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [*processes.CLI, "vllm-serve", "--model", str(model), "--port", str(self.port),
               "--dtype", "float32", "--enforce-eager"]  # fmt: skip
        self.group = processes.Group(cmd, cwd, env=ENV)
        deadline = time.time() + START_TIMEOUT_S
        while time.time() < deadline:
            if self.group.proc.poll() is not None:
                raise AssertionError(f"the server exited: {self.group._read()[1][-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(1)
        self.stop()
        raise AssertionError(f"the server did not answer within {START_TIMEOUT_S} s")

    def stop(self) -> None:
        if self.group.group_alive():
            self.group.signal_group(signal.SIGTERM)
            deadline = time.time() + 30
            while time.time() < deadline and (self.group.proc.poll() is None or self.group.group_alive()):
                time.sleep(0.2)
            if self.group.group_alive():
                self.group.signal_group(signal.SIGKILL)
        self.group.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = model_folder(tmp_path_factory.mktemp("served"))
    running = Server(folder, folder)
    yield running, folder
    running.stop()


def train(tmp_path, url, policy, *extra, timeout=400):
    cmd = [*processes.CLI, "train", "grpo", "--rollout_engine", "vllm-server", "--vllm_server_url", url,
           "--policy", str(policy), "--output_dir", str(tmp_path / "run"), "--report_to", "none",
           *extra]  # fmt: skip
    return cmd, processes.run(cmd, tmp_path, timeout=timeout, env=ENV)


def rows(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_the_sync_over_http_is_verified(server, tmp_path):
    """Pushed through a folder of safetensors and checked by fingerprint over /collective_rpc: an
    update that is not pushed is caught; after the push the server draws with the trainer's
    log-probs (tests/test_vllm.py's bound)."""
    running, folder = server
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    policy = AutoModelForCausalLM.from_pretrained(folder)
    sampler = ServerSampler(running.url, tokenizer, tmp_path / "sync", verify_every=1)
    assert sampler.sync(policy).verified
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with pytest.raises(EngineError, match="differ from the trainer's"):
        sampler.verify(policy)
    assert sampler.sync(policy).verified
    drawn = sample(
        sampler, tokenizer, tiny.synthetic_prompts(16, seed=3), SamplingSettings(8, 1.0, logprobs=True), "cpu"
    )
    with torch.no_grad():
        logp, _ = passes.token_logprobs_of(policy, drawn.tokens(False), temperature=1.0)
    torch.testing.assert_close(drawn.sampler_logp[drawn.response_mask], logp, atol=1e-4, rtol=0)


def test_a_run_through_the_server_learns(server, tmp_path):
    """tests/test_vllm.py's threshold for the in-process engine (60 iterations, seed 1)."""
    running, folder = server
    _, proc = train(tmp_path, running.url, folder, "--iterations", "60", "--seed", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = rows(tmp_path)
    first, last = (sum(r["reward"] for r in part) / 5 for part in (got[:5], got[-5:]))
    assert first < 0.25 and last > first + 0.25, (first, last)
    assert all(abs(r["rollout_kl"]) < 1e-5 and r["is_ratio_outside"] == 0 for r in got)


def test_eval_through_the_server_is_paired(server, tmp_path):
    """`fastppo eval --rollout_engine vllm-server`, a model against itself at temperature 1: the
    request seeds follow --seed, so both draw the same responses (a difference of exactly 0, a
    win rate of 0.5); the folder the weights went through is gone afterwards."""
    running, folder = server
    out = tmp_path / "eval.json"
    proc = processes.run(
        [*processes.CLI, "eval", "--policy", str(folder), "--baseline", str(folder), "--n_prompts", "32",
         "--rollout_engine", "vllm-server", "--vllm_server_url", running.url, "--output", str(out),
         "--plot", "none"],
        tmp_path, timeout=300, env=ENV,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["policy"] == result["baseline"] and result["win_rate"] == 0.5
    assert all(value in (0.0, None) for value in result["difference"].values())
    assert 0 < result["policy"]["reward"] < 1 and result["policy"]["distinct_2"] > 0.1  # sampled, not greedy
    assert not (tmp_path / "rollout-sync-eval").exists()


def test_an_unreachable_server_is_one_line(tmp_path):
    _, proc = train(
        tmp_path, f"http://127.0.0.1:{free_port()}", model_folder(tmp_path / "m"), "--iterations", "2"
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("fastppo train grpo: vllm_server_url: http://127.0.0.1")
    )
    assert "does not answer" in proc.stderr and "Traceback" not in proc.stderr


def test_a_server_of_another_model_is_one_line(server, tmp_path):
    running, _ = server
    _, proc = train(tmp_path, running.url, model_folder(tmp_path / "m", vocab_size=48), "--iterations", "2")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (
        "vocabulary of 32; the policy is a Qwen2ForCausalLM with 48" in proc.stderr.strip().splitlines()[-1]
    )


def test_a_server_that_dies_mid_run_leaves_a_checkpoint(tmp_path):
    folder = model_folder(tmp_path / "m")
    dying = Server(folder, tmp_path)
    try:
        cmd = [*processes.CLI, "train", "grpo", "--rollout_engine", "vllm-server", "--vllm_server_url",
               dying.url, "--policy", str(folder), "--output_dir", str(tmp_path / "run"),
               "--report_to", "none", "--iterations", "200"]  # fmt: skip
        run = processes.Group(cmd, tmp_path, env=ENV)
        processes.wait_for_lines(tmp_path / "run" / "metrics.jsonl", 2, run, timeout=200)
    finally:
        dying.stop()
    proc = run.wait(timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    done = len(rows(tmp_path))
    assert (tmp_path / "run" / f"checkpoint-{done}").is_dir()
    assert (
        "rollout engine vllm-server" in proc.stderr
        and f"saved {tmp_path / 'run'}/checkpoint-{done}" in proc.stderr
    )
    assert "--resume true" in proc.stderr and "Traceback" not in proc.stderr
