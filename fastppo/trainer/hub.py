"""Model arguments (``--policy``, ``--critic``, ``--model``, ``--reward``): a local folder, or a
Hugging Face model id that ``from_pretrained`` reads from the hub cache (and downloads into it when
online). Checked when the config is built, so that a wrong one stops the run with one line."""

import json
from pathlib import Path

from fastppo.trainer.errors import UsageError

#: ``tokenizer_class`` of a tokenizer whose tokenizer.json is its whole definition (the embedded
#: default's, and any built with the ``tokenizers`` library).
GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path: str):
    """The tokenizer saved in ``path`` (a folder or a model id). A folder whose tokenizer is declared
    generic is read as ``PreTrainedTokenizerFast``: with a config.json beside it, transformers 5's
    ``AutoTokenizer`` rebuilds it as the model type's tokenizer (a Qwen2 one for the tiny models:
    another pre-tokenizer, which drops the spaces)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config = Path(path).expanduser() / "tokenizer_config.json"
    try:
        declared = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    except (OSError, ValueError, AttributeError):
        declared = None
    loader = PreTrainedTokenizerFast if declared in GENERIC_TOKENIZERS else AutoTokenizer
    return loader.from_pretrained(path)


def looks_like_model_id(value: str) -> bool:
    """``name`` or ``org/name`` in the hub's alphabet (not a path: no leading ./, / or ~)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if value.startswith((".", "/", "~")) or value.count("/") > 1:
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def check_model(value: str, arg: str) -> None:
    """Raise a ``UsageError`` naming ``arg`` unless ``value`` is a model folder, a model id in the
    local hub cache, or (online) a model id ``from_pretrained`` may download."""
    path = Path(value).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{arg}: {value} is a file; a model folder or a Hugging Face model id expected")
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise UsageError(f"{arg}: {value} holds no Hugging Face model (no config.json)")
        return
    if not looks_like_model_id(value):
        raise UsageError(f"{arg}: no such folder: {value}")
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(value, "config.json"), str):
        return
    missing = f"{arg}: {value!r} is neither a folder nor a model in the local Hugging Face cache"
    if constants.HF_HUB_OFFLINE:
        raise UsageError(
            f"{missing} ({constants.HF_HUB_CACHE}); offline (HF_HUB_OFFLINE=1), so download it first "
            f"(`hf download {value}`) or pass a folder"
        )
    _check_on_the_hub(value, missing)


def _check_on_the_hub(model_id: str, missing: str) -> None:
    """Online, ``from_pretrained`` will download ``model_id``: make sure it can (one request)."""
    from huggingface_hub import model_info
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        model_info(model_id, timeout=10)
    except RepositoryNotFoundError:
        raise UsageError(f"{missing}, nor a model on the Hugging Face hub") from None
    except Exception as exc:  # no network, a proxy, a gated model: what from_pretrained would meet
        raise UsageError(f"{missing}, and the hub could not be asked for it ({type(exc).__name__})") from None
