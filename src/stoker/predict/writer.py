"""Predict output in ``output_dir``: append-as-you-go part files, resume bookkeeping and the final ordered files.

Layout::

    output_dir/
      predict_manifest.json        fingerprint of the config that produced the output (resume guard)
      predict_parts/part-00000.jsonl   rows, one part per process; appended and flushed as each chunk finishes
      generated_predictions.jsonl  the final file, in dataset order (written atomically at the end)
      predict_results.json, all_results.json

A killed run leaves its part files behind; the next run with the same config reads them, skips the rows they hold
and appends the rest. A half-written last line (the process died mid-write) is ignored and cut off before appending.
A different config is refused with a ``ConfigError`` rather than mixed in. ``merge`` writes the final file in the
order given, from the previous final file (if any) and the parts, then removes the parts.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from stoker.errors import ConfigError

logger = logging.getLogger("stoker")

PREDICTIONS_FILE = "generated_predictions.jsonl"
MANIFEST_FILE = "predict_manifest.json"
PARTS_DIR = "predict_parts"
RESULTS_FILE = "predict_results.json"
ALL_RESULTS_FILE = "all_results.json"
MANIFEST_VERSION = 1

RowKey = tuple[str, int]
Record = dict[str, Any]

# Settings that change what predict writes. Output is only resumed under the same values (plus the data digests).
OUTPUT_KEYS = (
    "model_name_or_path", "adapter_name_or_path", "adapter_folder", "finetuning_type", "merge_adapters", "template",
    "infer_backend", "infer_dtype", "default_system", "enable_thinking", "do_sample", "temperature", "top_p", "top_k",
    "num_beams", "max_new_tokens", "max_length", "repetition_penalty", "length_penalty", "skip_special_tokens", "seed",
    "dataset_dir", "dataset", "eval_dataset", "media_dir", "max_samples", "cutoff_len", "on_bad_row",
    "image_max_pixels", "image_min_pixels", "model_revision", "vllm_maxlen", "vllm_config",
    "quantization_bit", "quantization_method", "quantization_type", "double_quantization", "rope_scaling",
    "flash_attn", "tool_format", "preserve_thinking", "split_special_tokens", "bf16", "fp16", "pure_bf16",
    "json_schema", "response_format", "compare",
)  # fmt: skip

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".model", ".tiktoken")


def files_stamp(folders: Sequence[Path]) -> list[list[Any]]:
    """Name, size and modification time of the weight, config and tokenizer files in ``folders``: a model or adapter
    retrained into the same path changes them, and nothing has to hash gigabytes at every start. (A copied model
    gets new times, so its old output is refused rather than trusted.)"""
    stamp: list[list[Any]] = []
    for i, folder in enumerate(folders):
        for file in sorted(folder.rglob("*")):
            if file.is_file() and file.suffix in WEIGHT_SUFFIXES and ".cache" not in file.parts:
                info = file.stat()
                stamp.append([i, file.relative_to(folder).as_posix(), info.st_size, info.st_mtime_ns])
    return stamp


class PredictionStore:
    """The output of one predict config in one ``output_dir``."""

    def __init__(self, output_dir: str | Path, fingerprint: Mapping[str, Any]):
        self.output_dir = Path(output_dir)
        # Normalized through JSON so that tuples, paths and the like compare equal to what was saved.
        self.fingerprint: dict[str, Any] = json.loads(json.dumps(dict(fingerprint), default=str, sort_keys=True))

    @property
    def predictions_path(self) -> Path:
        return self.output_dir / PREDICTIONS_FILE

    @property
    def manifest_path(self) -> Path:
        return self.output_dir / MANIFEST_FILE

    @property
    def parts_dir(self) -> Path:
        return self.output_dir / PARTS_DIR

    def part_path(self, rank: int) -> Path:
        return self.parts_dir / f"part-{rank:05d}.jsonl"

    # --- setup (main process only, before any part is opened) ------------------------------------------------------
    def prepare(self, *, overwrite: bool = False) -> None:
        """Start over (``overwrite``), or check that what is already there came from this same config."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            self._clear()
        elif self.manifest_path.exists() and not self._holds_rows():
            self._clear()  # a run that stopped before its first row (e.g. on a bad row): nothing to keep or mix
        elif self.manifest_path.exists():
            saved = self._read_manifest()
            if saved != self.fingerprint:
                raise ConfigError(
                    f"output_dir {self.output_dir} holds predictions made with a different config "
                    f"({_describe_diff(saved, self.fingerprint)}). Set overwrite_output_dir: true (or pass "
                    "--overwrite) to start over, or choose another output_dir.",
                    param="output_dir",
                )
            return
        elif self.predictions_path.exists() or self.parts_dir.exists():
            raise ConfigError(
                f"output_dir {self.output_dir} already holds {PREDICTIONS_FILE} from another run (it has no "
                f"{MANIFEST_FILE} saying which config made it). Set overwrite_output_dir: true (or pass --overwrite) "
                "to replace it, or choose another output_dir.",
                param="output_dir",
            )
        manifest = {"version": MANIFEST_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "fingerprint": self.fingerprint}  # fmt: skip
        _write_atomic(self.manifest_path, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")

    def _clear(self) -> None:
        for path in (self.manifest_path, self.predictions_path, self.output_dir / RESULTS_FILE):
            path.unlink(missing_ok=True)
        shutil.rmtree(self.parts_dir, ignore_errors=True)

    def _holds_rows(self) -> bool:
        parts = self.parts_dir.glob("part-*.jsonl") if self.parts_dir.is_dir() else []
        return self.predictions_path.exists() or any(p.stat().st_size > 0 for p in parts)

    def _read_manifest(self) -> dict[str, Any]:
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
            return manifest["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"{self.manifest_path} is unreadable ({exc}). Set overwrite_output_dir: true (or pass --overwrite) to "
                "start over, or choose another output_dir.",
                param="output_dir",
            ) from exc

    # --- reading what is done --------------------------------------------------------------------------------------
    def completed(self) -> dict[RowKey, Record]:
        """Every row saved so far (previous final file, then parts), keyed by (dataset, index); first copy wins."""
        records: dict[RowKey, Record] = {}
        sources = [self.predictions_path]
        if self.parts_dir.is_dir():
            sources += sorted(self.parts_dir.glob("part-*.jsonl"))
        for path in sources:
            if path.exists():
                for record in _read_records(path):
                    records.setdefault((record["dataset"], record["index"]), record)
        return records

    def done_keys(self) -> set[RowKey]:
        return set(self.completed())

    # --- writing ---------------------------------------------------------------------------------------------------
    def open_part(self, rank: int = 0) -> PartWriter:
        """The append-only part file of process ``rank``; a torn last line from a killed run is cut off first."""
        path = self.part_path(rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        _drop_torn_tail(path)
        return PartWriter(path)

    def merge(self, order: Sequence[RowKey]) -> list[Record]:
        """Write the final file with one record per key, in ``order``; then remove the parts. Returns the records."""
        records = self.completed()
        missing = [key for key in order if key not in records]
        if missing:
            first = ", ".join(f"{d!r} row {i}" for d, i in missing[:3])
            raise RuntimeError(f"{len(missing)} rows have no prediction yet (first: {first}); cannot merge")
        extra = len(records) - len(set(order) & records.keys())
        if extra:
            logger.warning("%d saved predictions are for rows not in this run; they are left out", extra)
        ordered = [records[key] for key in order]
        _write_atomic(self.predictions_path, "".join(_dump(r) for r in ordered))
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        return ordered


class PartWriter:
    """Appends records as JSON lines and flushes each, so that a kill loses nothing this writer was given."""

    def __init__(self, path: Path):
        self.path = path
        self._file: IO[str] | None = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, record: Mapping[str, Any]) -> None:
        if self._file is None:
            raise ValueError(f"{self.path} is closed")
        if not _is_record(record):
            raise ValueError("a prediction record needs 'dataset' (str) and 'index' (int)")
        self._file.write(_dump(record))
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def save_metrics(output_dir: str | Path, metrics: Mapping[str, Any], split: str = "predict") -> None:
    """``<split>_results.json``, and the same keys merged into ``all_results.json``, as transformers' Trainer does."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(output_dir / f"{split}_results.json", json.dumps(dict(metrics), indent=4, sort_keys=True) + "\n")
    all_path = output_dir / ALL_RESULTS_FILE
    combined: dict[str, Any] = {}
    if all_path.exists():
        try:
            combined = json.loads(all_path.read_text(encoding="utf-8"))
        except ValueError:
            logger.warning("%s is not valid JSON; rewriting it", all_path)
    combined.update(metrics)
    _write_atomic(all_path, json.dumps(combined, indent=4, sort_keys=True) + "\n")


# --- helpers -------------------------------------------------------------------------------------------------------


def _dump(record: Mapping[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def _is_record(record: Any) -> bool:
    return isinstance(record, Mapping) and isinstance(record.get("dataset"), str) and type(record.get("index")) is int


def _read_records(path: Path) -> Iterator[Record]:
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith("\n"):
                return  # torn last line of a killed run: that row is done again
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s line %d is not valid JSON; that row will be predicted again", path, number)
                continue
            if _is_record(record):
                yield record
            else:
                logger.warning("%s line %d has no dataset/index; ignored", path, number)


def _drop_torn_tail(path: Path) -> None:
    if not path.exists():
        return
    with open(path, "rb+") as f:
        data = f.read()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            f.truncate(keep)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _describe_diff(saved: Mapping[str, Any], current: Mapping[str, Any], limit: int = 4) -> str:
    keys = sorted(k for k in saved.keys() | current.keys() if saved.get(k, "<unset>") != current.get(k, "<unset>"))

    def show(value: Any) -> str:
        text = json.dumps(value, ensure_ascii=False, default=str) if value != "<unset>" else "unset"
        return text if len(text) <= 60 else text[:57] + "..."

    parts = [f"{k}: {show(saved.get(k, '<unset>'))} -> {show(current.get(k, '<unset>'))}" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"and {len(keys) - limit} more")
    return "; ".join(parts)
