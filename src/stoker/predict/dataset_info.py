"""``dataset_info.json``: LLaMA-Factory's registry of datasets, read without changes.

Each entry says where a dataset lives (``file_name``, ``hf_hub_url``, ...), how its rows are shaped (``formatting``:
alpaca, sharegpt or openai) and which columns and role tags to read. Two LLaMA-Factory rules matter for fidelity:

- when an entry has a ``columns`` object, every column it does not name is unset (``None``), not defaulted. So
  ``{"columns": {"prompt": "text"}}`` means "no response column" (an unlabeled dataset);
- likewise a ``tags`` object unsets the tags it does not name.

The ``openai`` formatting gets OpenAI's role names when the entry gives no ``tags`` (LLaMA-Factory would fall back to
the sharegpt tags and fail on every row).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from stoker.errors import DataError
from stoker.paths import shown

INFO_FILE = "dataset_info.json"

Formatting = Literal["alpaca", "sharegpt", "openai"]
Source = Literal["file", "hf_hub", "ms_hub", "om_hub", "script", "cloud_file"]

COLUMN_NAMES = (
    "prompt", "query", "response", "history", "messages", "system", "tools",
    "images", "videos", "audios", "chosen", "rejected", "kto_tag",
)  # fmt: skip
TAG_NAMES = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")

_DEFAULT_COLUMNS: dict[str, str | None] = {
    **dict.fromkeys(COLUMN_NAMES),
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "messages": "conversations",
}
_SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
_OPENAI_TAGS = {
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "observation_tag": "tool",
    "function_tag": None,  # OpenAI puts tool calls on assistant messages, not in a role of their own
    "system_tag": "system",
}
_KNOWN_KEYS = {
    "file_name", "hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name", "formatting", "ranking",
    "subset", "split", "folder", "num_samples", "columns", "tags", "revision",
}  # fmt: skip


@dataclass(frozen=True)
class DatasetSpec:
    """One ``dataset_info.json`` entry, with LLaMA-Factory's defaults filled in."""

    name: str
    source: Source
    location: str  # file or folder name (relative to dataset_dir), or hub repo id, or script folder
    formatting: Formatting = "alpaca"
    ranking: bool = False
    subset: str | None = None
    split: str = "train"
    folder: str | None = None
    num_samples: int | None = None
    revision: str | None = None
    columns: dict[str, str | None] = field(default_factory=lambda: dict(_DEFAULT_COLUMNS))
    tags: dict[str, str | None] = field(default_factory=lambda: dict(_SHAREGPT_TAGS))
    entry: dict[str, Any] = field(default_factory=dict)  # the raw entry, for fingerprints and messages

    def column(self, key: str) -> str | None:
        return self.columns.get(key)

    def tag(self, key: str) -> str | None:
        return self.tags.get(key)


def read_dataset_info(dataset_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The raw entries of ``dataset_dir/dataset_info.json``."""
    path = Path(dataset_dir) / INFO_FILE
    if not path.is_file():
        hint = "" if Path(dataset_dir).is_dir() else ", a folder that does not exist"
        raise DataError(
            f"no {INFO_FILE} in dataset_dir {shown(dataset_dir)}{hint}: set dataset_dir to the folder that holds "
            f"{INFO_FILE} (LLaMA-Factory's is its data/ folder).",
            param="dataset_dir",
        )
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}. Fix the file (it must be one JSON object).") from exc
    if not isinstance(info, dict):
        raise DataError(f"{path} must hold one JSON object mapping dataset names to entries.")
    return info


def get_dataset_spec(name: str, dataset_dir: str | Path, info: dict[str, dict[str, Any]] | None = None) -> DatasetSpec:
    """Parse the entry ``name`` of ``dataset_dir/dataset_info.json``."""
    info = read_dataset_info(dataset_dir) if info is None else info
    if name not in info:
        import difflib

        close = difflib.get_close_matches(name, list(info), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise DataError(
            f"dataset {name!r} is not defined in {Path(dataset_dir) / INFO_FILE}.{hint} Add an entry for it, or fix "
            "the name in eval_dataset.",
            param="eval_dataset",
        )
    return parse_entry(name, info[name], where=str(Path(dataset_dir) / INFO_FILE))


def parse_entry(name: str, entry: Any, *, where: str = INFO_FILE) -> DatasetSpec:
    """Turn one raw entry into a ``DatasetSpec``, checking types so that mistakes surface with the entry's name."""
    if not isinstance(entry, dict):
        raise DataError(f"{where}: entry {name!r} must be a JSON object, got {type(entry).__name__}.")
    unknown = sorted(set(entry) - _KNOWN_KEYS)
    if unknown:
        # LLaMA-Factory ignores unknown keys too; they are often comments. Not an error.
        import logging

        logging.getLogger("stoker").debug("%s: entry %r has keys Stoker ignores: %s", where, name, unknown)

    # Where the data lives; the order is LLaMA-Factory's precedence (the hub wins over local files).
    source: Source
    if "hf_hub_url" in entry:
        source, location = "hf_hub", entry["hf_hub_url"]
    elif "ms_hub_url" in entry:
        source, location = "ms_hub", entry["ms_hub_url"]
    elif "om_hub_url" in entry:
        source, location = "om_hub", entry["om_hub_url"]
    elif "script_url" in entry:
        source, location = "script", entry["script_url"]
    elif "cloud_file_name" in entry:
        source, location = "cloud_file", entry["cloud_file_name"]
    elif "file_name" in entry:
        source, location = "file", entry["file_name"]
    else:
        raise DataError(
            f"{where}: entry {name!r} says nowhere where its data is: give it a \"file_name\" (a file or folder in "
            "dataset_dir) or an \"hf_hub_url\"."
        )
    if not isinstance(location, str) or not location:
        raise DataError(f"{where}: entry {name!r} has an empty or non-string location {location!r}.")

    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt", "openai"):
        raise DataError(
            f"{where}: entry {name!r} has formatting {formatting!r}; allowed: alpaca, sharegpt, openai."
        )

    columns = dict(_DEFAULT_COLUMNS)
    if "columns" in entry:
        raw = _mapping(entry["columns"], f"{where}: entry {name!r}: \"columns\"")
        columns = {key: raw.get(key) for key in COLUMN_NAMES}

    if "tags" in entry:
        raw = _mapping(entry["tags"], f"{where}: entry {name!r}: \"tags\"")
        tags = {key: raw.get(key) for key in TAG_NAMES}
    else:
        tags = dict(_OPENAI_TAGS if formatting == "openai" else _SHAREGPT_TAGS)

    num_samples = entry.get("num_samples")
    if num_samples is not None and (type(num_samples) is not int or num_samples < 1):
        raise DataError(f"{where}: entry {name!r} has num_samples {num_samples!r}; it must be a positive integer.")
    ranking = entry.get("ranking", False)
    if not isinstance(ranking, bool):
        raise DataError(f"{where}: entry {name!r} has ranking {ranking!r}; it must be true or false.")

    return DatasetSpec(
        name=name,
        source=source,
        location=location,
        formatting=formatting,
        ranking=ranking,
        subset=entry.get("subset"),
        split=entry.get("split", "train"),
        folder=entry.get("folder"),
        num_samples=num_samples,
        revision=entry.get("revision"),
        columns=columns,
        tags=tags,
        entry=entry,
    )


def _mapping(value: Any, what: str) -> dict[str, str | None]:
    if not isinstance(value, dict) or not all(isinstance(v, str) or v is None for v in value.values()):
        raise DataError(f"{what} must be an object mapping names to column (or tag) names.")
    return value
