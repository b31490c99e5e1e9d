"""What fastppo adds to each vLLM worker (``worker_extension_cls``): its weights' layout and
fingerprints for the verified sync, and an in-place reload from a folder of safetensors (the sync
of a server where NCCL is not available). Arguments and results are JSON-able, so the same methods
serve an engine in this process (``LLM.collective_rpc``) and a server (``POST /collective_rpc``).

This module is imported inside vLLM's workers: it imports nothing of fastppo but the fingerprint
math, and nothing that needs a GPU.
"""

import json
from pathlib import Path

import torch

from fastppo.trainer.sampling import fingerprint


class WorkerExtension:
    """Mixed into vLLM's worker class; ``self.model_runner`` is the worker's."""

    def _fastppo_model(self) -> torch.nn.Module:
        return self.model_runner.get_model()

    def fastppo_layout(self) -> dict:
        """``fingerprint.EngineLayout`` as JSON: every parameter, whether it can only be probed (a
        linear layer repacked for the backend's kernel), the fused modules and the model's identity."""
        model = self._fastppo_model()
        params = {}
        for name, p in model.named_parameters():
            module = model.get_submodule(name.rpartition(".")[0])
            probe = p.numel() == 0 and hasattr(getattr(module, "quant_method", None), "apply")
            params[name] = {"shape": list(p.shape), "probe": probe}
        config = self.model_runner.model_config
        return {
            "params": params,
            "packed": {k: list(v) for k, v in getattr(model, "packed_modules_mapping", {}).items()},
            "architecture": type(model).__name__,
            "vocab_size": int(config.get_vocab_size()),
            "dtype": str(config.dtype),
        }

    @torch.no_grad()
    def fastppo_fingerprints(self, spec: str) -> dict:
        """{name: [s, q, m]} for the parameters of ``spec`` (JSON {name: {"rows", "cols"}})."""
        model = self._fastppo_model()
        out = {}
        for name, want in json.loads(spec).items():
            module_name, _, leaf = name.rpartition(".")
            module = model.get_submodule(module_name)
            p = module.get_parameter(leaf)
            if p.numel() > 0:
                out[name] = fingerprint.of_tensor(p, rows=want["rows"])
                continue
            x = fingerprint.probe_input(want["cols"], p.dtype, p.device)
            y = module.quant_method.apply(module, x, bias=None)  # (k, out): the engine's own kernel
            out[name] = fingerprint.of_tensor(y.T.contiguous(), rows=want["rows"])
        return out

    def fastppo_reload_folder(self, folder: str) -> int:
        """Load every ``*.safetensors`` of ``folder`` into the model in place; returns the tensor count."""
        from safetensors import safe_open

        files = sorted(Path(folder).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{folder}: no *.safetensors to load")
        count = 0

        def tensors():
            nonlocal count
            for path in files:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                        count += 1
                        yield key, f.get_tensor(key)

        self.reload_weights(weights_iterator=tensors())
        return count
