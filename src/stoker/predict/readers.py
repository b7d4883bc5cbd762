"""Raw rows of a dataset: local json, jsonl, csv, parquet, arrow or text files (or folders of them), or the HF hub.

Rows come back as plain Python objects in file order. A line of a JSON-lines file that does not parse is kept as an
``UnreadableRow`` so that it is reported like any other bad row, with its row number, instead of sinking the whole
file. Each read also yields a digest of exactly what was read, so resumed output can be tied to the data it came from.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from stoker.errors import DataError
from stoker.predict.dataset_info import DatasetSpec

# File kinds by extension, as LLaMA-Factory maps them.
FILE_KINDS = {"json": "json", "jsonl": "json", "csv": "csv", "parquet": "parquet", "arrow": "arrow", "txt": "text"}


@dataclass(frozen=True)
class UnreadableRow:
    """A row that could not be parsed (e.g. a broken JSON line)."""

    reason: str


@dataclass
class RawRows:
    rows: list[Any]
    digest: str  # sha256 of the bytes read (local files) or the hub dataset's identity
    origin: str  # for messages: the file, folder or hub id
    media_base: Path | None  # relative media paths resolve against this; None for hub datasets


def read_rows(
    spec: DatasetSpec,
    dataset_dir: str | Path,
    *,
    media_dir: str | Path | None = None,
    limit: int | None = None,
    cache_dir: str | None = None,
    token: str | None = None,
) -> RawRows:
    """All rows of ``spec`` (the first ``limit`` when given), in file order."""
    if spec.source == "file":
        files = local_files(spec, dataset_dir)
        rows: list[Any] = []
        digest = hashlib.sha256()
        for path in files:
            data = path.read_bytes()
            digest.update(path.name.encode() + b"\0" + data + b"\0")
            rows.extend(_parse_file(path, data, spec))
        base = Path(media_dir) if media_dir is not None else Path(dataset_dir)
        origin = str(Path(dataset_dir) / spec.location)
        return RawRows(rows[:limit] if limit is not None else rows, digest.hexdigest(), origin, base)
    if spec.source == "hf_hub":
        return _read_hf_hub(spec, limit=limit, cache_dir=cache_dir, token=token)
    reasons = {
        "ms_hub": f"comes from the ModelScope hub ({spec.location}), which Stoker does not download from",
        "om_hub": f"comes from the Modelers hub ({spec.location}), which Stoker does not download from",
        "script": f"is built by a loading script ({spec.location}), which Stoker does not run",
        "cloud_file": f"lives in cloud storage ({spec.location}), which Stoker does not read",
    }
    raise DataError(
        f"dataset {spec.name!r} {reasons[spec.source]}. Download or export it as a json, jsonl, csv or parquet file "
        "into dataset_dir and point its \"file_name\" at that file.",
        param="eval_dataset",
    )


def local_files(spec: DatasetSpec, dataset_dir: str | Path) -> list[Path]:
    """The data files of a ``file_name`` entry: the file itself, or every file in the folder (sorted by name)."""
    path = Path(dataset_dir) / spec.location
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"dataset {spec.name!r}: the folder {path} holds no data files.", param="eval_dataset")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(
            f"dataset {spec.name!r}: {path} does not exist. Fix \"file_name\" in dataset_info.json, or dataset_dir "
            f"(now {dataset_dir}).",
            param="eval_dataset",
        )
    kinds = {_file_kind(p, spec) for p in files}
    if len(kinds) > 1:
        raise DataError(
            f"dataset {spec.name!r}: the folder {path} mixes file types ({', '.join(sorted(kinds))}); keep one type "
            "per dataset folder.",
            param="eval_dataset",
        )
    return files


def _file_kind(path: Path, spec: DatasetSpec) -> str:
    kind = FILE_KINDS.get(path.suffix.lower().lstrip("."))
    if kind is None:
        raise DataError(
            f"dataset {spec.name!r}: {path} has an unsupported file type; allowed: "
            f"{', '.join('.' + ext for ext in FILE_KINDS)}.",
            param="eval_dataset",
        )
    return kind


def _parse_file(path: Path, data: bytes, spec: DatasetSpec) -> list[Any]:
    kind = _file_kind(path, spec)
    where = f"dataset {spec.name!r}: {path}"
    if kind in ("json", "csv", "text"):
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DataError(f"{where} is not UTF-8 text ({exc}). Re-save it as UTF-8.") from exc
        if kind == "json":
            return _parse_json(text, where)
        if kind == "csv":
            return list(csv.DictReader(io.StringIO(text, newline="")))
        # One row per line, as the `text` loader of HF datasets does.
        return [{"text": line} for line in text.splitlines()]
    try:
        import pyarrow  # noqa: F401
    except ImportError as exc:
        raise DataError(
            f"{where} needs pyarrow to read; install it with `pip install pyarrow` (or `pip install 'stoker[data]'`)."
        ) from exc
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(io.BytesIO(data)).to_pylist()
        import pyarrow.ipc as ipc

        try:  # HF datasets caches are Arrow streams; `pyarrow.feather` writes the file format
            return ipc.open_stream(io.BytesIO(data)).read_all().to_pylist()
        except Exception:
            return ipc.open_file(io.BytesIO(data)).read_all().to_pylist()
    except Exception as exc:
        raise DataError(f"{where} is not a readable {kind} file: {exc}") from exc


def _parse_json(text: str, where: str) -> list[Any]:
    """A JSON array of rows, or JSON lines (in a .json or .jsonl file alike, as HF datasets accepts both)."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}.") from exc
        return rows
    if stripped.startswith("{"):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # several objects: JSON lines
        if isinstance(whole, dict):
            raise DataError(f"{where} holds a single JSON object; a dataset file holds a list of rows (or JSON lines).")
    rows: list[Any] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            rows.append(UnreadableRow(f"this line is not valid JSON ({exc.msg} at column {exc.colno})"))
    return rows


def _offline_mode() -> bool:
    return any(
        os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _hub_unreachable() -> str | None:
    """Why the HF hub cannot be reached right now, or None. Checked up front: the hub client retries for ~30 s."""
    if _offline_mode():
        return None  # `datasets` looks in its cache only, and fails fast when the dataset is not there
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=5):
            return None
    except OSError as exc:
        return f"{url.hostname} is unreachable ({exc})"


def _read_hf_hub(spec: DatasetSpec, *, limit: int | None, cache_dir: str | None, token: str | None) -> RawRows:
    download = f"Download it where there is network (`hf download --repo-type dataset {spec.location}`)"
    local = 'or save it as a local file and point "file_name" at it.'
    if _offline_mode():
        fix = f"Offline mode (HF_HUB_OFFLINE) is on and it is not in the local cache. {download}, {local}"
    else:
        fix = f"{download} and either set HF_HUB_OFFLINE=1 to use the cached copy, {local}"
    why = _hub_unreachable()
    if why is not None:
        raise DataError(
            f"dataset {spec.name!r} comes from the Hugging Face hub ({spec.location}) but {why}. {fix}",
            param="eval_dataset",
        )
    try:
        import datasets
    except ImportError as exc:
        raise DataError(
            f"dataset {spec.name!r} comes from the Hugging Face hub ({spec.location}); reading it needs the "
            f"`datasets` package (`pip install datasets`). {fix}",
            param="eval_dataset",
        ) from exc
    try:
        ds = datasets.load_dataset(
            spec.location,
            name=spec.subset,
            data_dir=spec.folder,
            split=spec.split,
            revision=spec.revision,
            cache_dir=cache_dir,
            token=token,
        )
    except Exception as exc:  # the hub client raises many types; all mean "could not get it"
        raise DataError(
            f"dataset {spec.name!r} could not be loaded from the Hugging Face hub ({spec.location}, split "
            f"{spec.split!r}): {exc}. {fix}",
            param="eval_dataset",
        ) from exc
    if limit is not None and limit < len(ds):
        ds = ds.select(range(limit))
    identity = f"hf_hub:{spec.location}:{spec.subset}:{spec.folder}:{spec.split}:{spec.revision}"
    digest = hashlib.sha256(f"{identity}:{getattr(ds, '_fingerprint', '')}".encode()).hexdigest()
    return RawRows(ds.to_list(), digest, spec.location, None)
