"""Where rows come from. ``--data`` (PPO's ``--prompts``, the offline loops' ``--data``, ``fastppo
eval --prompts``) names one of

    a file            .jsonl, .json, .csv or .parquet (any other name: JSON lines)
    a folder          written by Dataset.save_to_disk or DatasetDict.save_to_disk (--data_split
                      picks the split of a DatasetDict), or a folder of data files
    a dataset id      owner/name on the Hugging Face hub; --data_split (default train), --data_config.
                      Offline (HF_HUB_OFFLINE=1): from the hub cache (`hf download --repo-type
                      dataset`) or datasets' own cache; online: as load_dataset downloads it

and is read through the ``datasets`` library into a ``datasets.Dataset``: Arrow tables, memory-mapped,
whose rows are read when asked for. Every mistake is a ``UsageError`` of one line naming the flag or
the source, and the row where there is one (its line, for a JSON-lines file).
"""

import contextlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from fastppo.trainer.errors import UsageError
from fastppo.trainer.hub import looks_like_model_id

#: File suffixes and the ``datasets`` builder that reads them.
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
#: What ``save_to_disk`` leaves in a folder: a Dataset's state, a DatasetDict's split list.
SAVED = ("state.json", "dataset_dict.json")


@dataclass(frozen=True)
class Source:
    """What a data flag names (``value``) and how to read it; ``arg`` is the flag, for errors."""

    value: str
    arg: str = "data"
    split: str = "train"
    config: str | None = None

    @classmethod
    def of(cls, cfg, arg: str) -> "Source":
        """The source in field ``arg`` of a config with the ``DataFields`` (data_split, data_config)."""
        return cls(getattr(cfg, arg), arg, cfg.data_split, cfg.data_config)

    @property
    def path(self) -> Path:
        return Path(self.value).expanduser()

    @property
    def kind(self) -> str:
        """'file', 'folder', 'id' (a dataset id, not a local path) or 'missing'."""
        if self.path.is_file():
            return "file"
        if self.path.is_dir():
            return "folder"
        if self.path.suffix.lower() in FORMATS or not looks_like_model_id(self.value):
            return "missing"
        return "id"

    def row_number(self, index: int) -> int:
        """The 1-based number of row ``index`` as a user finds it: its line in a JSON-lines file
        (blank lines are skipped when reading), its position elsewhere."""
        if self.kind != "file" or not _json_lines(self.path):
            return index + 1
        with open(self.path, encoding="utf-8") as f:
            seen = 0
            for number, line in enumerate(f, 1):
                seen += bool(line.strip())
                if seen == index + 1:
                    return number
        return index + 1


# --------------------------------------------------------------------------------------------
# At config time: the source exists.


def check_source(source: Source) -> None:
    """A ``UsageError`` naming ``source.arg`` unless the source is a file, a dataset folder, or a
    dataset id in the local Hugging Face cache (online: one the hub has)."""
    kind = source.kind
    if kind == "missing":
        raise UsageError(f"{source.arg}: no such file: {source.value}")
    if importlib.util.find_spec("datasets") is None:  # a core dependency, imported only to read data
        raise UsageError(
            f"{source.arg}: reading {source.value} needs the datasets library (pip install datasets)"
        )
    if kind == "folder" and not _dataset_folder(source.path):
        raise UsageError(
            f"{source.arg}: {source.value} holds no dataset (no save_to_disk state.json or "
            f"dataset_dict.json, no {', '.join(FORMATS)} files)"
        )
    if kind == "id" and _hub_snapshot(source.value) is None and not _in_datasets_cache(source.value):
        _check_id_online(source)


def _dataset_folder(path: Path) -> bool:
    """A save_to_disk folder, or one with data files (at most two levels down)."""
    if any((path / name).is_file() for name in SAVED):
        return True
    patterns = [f"{d}*{suffix}" for d in ("", "*/", "*/*/") for suffix in FORMATS]
    return any(next(path.glob(p), None) is not None for p in patterns)


def offline() -> bool:
    """HF_HUB_OFFLINE or HF_DATASETS_OFFLINE, as ``datasets`` reads them."""
    import datasets

    return bool(datasets.config.HF_HUB_OFFLINE)


def _hub_snapshot(dataset_id: str) -> str | None:
    """The folder of ``dataset_id``'s newest snapshot in the hub cache (``hf download --repo-type
    dataset``), or None when it is not there."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(dataset_id, repo_type="dataset", local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError):
        return None


def _in_datasets_cache(dataset_id: str) -> bool:
    """``datasets`` has prepared ``dataset_id`` before (its Arrow cache, read offline)."""
    import datasets

    return (Path(datasets.config.HF_DATASETS_CACHE) / dataset_id.replace("/", "___")).is_dir()


def _check_id_online(source: Source) -> None:
    from huggingface_hub import constants, dataset_info
    from huggingface_hub.errors import RepositoryNotFoundError

    missing = (
        f"{source.arg}: {source.value!r} is neither a file, a folder nor a dataset in the local "
        f"Hugging Face cache"
    )
    if offline():
        raise UsageError(
            f"{missing} ({constants.HF_HUB_CACHE}); offline (HF_HUB_OFFLINE=1), so download it first "
            f"(`hf download {source.value} --repo-type dataset`) or pass a file or folder"
        )
    try:
        dataset_info(source.value, timeout=10)
    except RepositoryNotFoundError:
        raise UsageError(f"{missing}, nor a dataset on the Hugging Face hub") from None
    except Exception as exc:  # no network, a proxy, a gated dataset: what load_dataset would meet
        raise UsageError(f"{missing}, and the hub could not be asked for it ({type(exc).__name__})") from None


# --------------------------------------------------------------------------------------------
# Reading.


@contextlib.contextmanager
def _quiet():
    """No progress bars or cache notices from ``datasets`` while it reads: one line per mistake."""
    import datasets

    bars = datasets.utils.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not bars:
            datasets.enable_progress_bars()


def open_dataset(source: Source):
    """The ``datasets.Dataset`` of ``source`` (its split ``source.split`` where it has splits).
    Nothing is read into Python lists; a file is converted to Arrow once (the ``datasets`` cache)."""
    check_source(source)
    with _quiet():
        if source.kind == "file":
            dataset = _open_file(source)
        elif any((source.path / name).is_file() for name in SAVED):
            dataset = _open_saved(source)
        elif source.kind == "folder":
            dataset = _open_builder(str(source.path), source)
        else:  # offline, the hub cache's snapshot; online, datasets' own download and cache
            dataset = _open_builder((offline() and _hub_snapshot(source.value)) or source.value, source)
    if len(dataset) == 0:
        raise UsageError(f"{source.value}: no rows")
    return dataset


def _open_file(source: Source):
    import datasets

    path = source.path
    builder = FORMATS.get(path.suffix.lower(), "json")
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # datasets wraps what pyarrow and the parsers raise
        if _blank(path):
            raise UsageError(f"{source.value}: no rows") from None
        if _json_lines(path):
            scan_json_lines(source.value)  # names the line that is not a JSON object
        cause = exc.__cause__ or exc
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise UsageError(f"{source.value}: not a readable {builder.upper()} file ({first})") from None


def _blank(path: Path) -> bool:
    """Nothing but whitespace in the file (read up to its first other byte)."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _json_lines(path: Path) -> bool:
    """Read as JSON lines: .jsonl, and any name ``FORMATS`` does not know."""
    return path.suffix.lower() == ".jsonl" or path.suffix.lower() not in FORMATS


def scan_json_lines(path: str) -> None:
    """Raise a ``UsageError`` at the first line of a JSON-lines file that is not a JSON object
    (naming the file and the line); return when every line is one."""
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UsageError(
                        f"{path}: row {number}: not valid JSON ({exc.msg}, column {exc.colno})"
                    ) from None
                if not isinstance(row, dict):
                    raise UsageError(f"{path}: row {number}: a JSON object expected")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a UTF-8 text file (JSON lines)") from None


def _open_saved(source: Source):
    """A save_to_disk folder: its Dataset, or the split ``source.split`` of its DatasetDict."""
    import datasets

    try:
        saved = datasets.load_from_disk(str(source.path))
    except Exception as exc:
        raise UsageError(
            f"{source.arg}: cannot read {source.value} ({str(exc).strip().splitlines()[0]})"
        ) from None
    if isinstance(saved, datasets.DatasetDict):
        _check_split(source, list(saved))
        return saved[source.split]
    return saved


def _open_builder(path: str, source: Source):
    """A folder of data files, a hub snapshot folder or (not cached as files) a dataset id: its
    configuration ``source.config`` and split ``source.split``, prepared by ``datasets``."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(path, name=source.config)
    except ValueError as exc:  # an unknown configuration
        names = _config_names(path)
        if source.config is not None and names and source.config not in names:
            raise UsageError(
                f"{source.arg}: {source.value} has no configuration {source.config!r} (its configurations: "
                f"{', '.join(names)}); pass --data_config"
            ) from None
        raise UsageError(f"{source.arg}: {source.value}: {str(exc).strip().splitlines()[0]}") from None
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise UsageError(f"{source.arg}: {source.value}: {str(exc).strip().splitlines()[0]}") from None
    splits = list(builder.config.data_files or builder.info.splits or [])
    if splits:
        _check_split(source, [str(s) for s in splits])
    builder.download_and_prepare()
    return builder.as_dataset(split=source.split)


def _config_names(path: str) -> list[str]:
    """The configurations of a dataset folder or id (none when they cannot be listed)."""
    import datasets

    try:
        return list(datasets.get_dataset_config_names(path))
    except Exception:  # the error being explained is the one to report
        return []


def _check_split(source: Source, splits: list[str]) -> None:
    base = source.split.split("[")[0]  # datasets' slicing: train[:100], train[10%:]
    if base not in splits:
        raise UsageError(
            f"{source.arg}: {source.value} has no split {base!r} (its splits: {', '.join(splits)}); "
            "pass --data_split"
        )
