"""Load the datasets to predict on: ``dataset_info.json`` entry -> raw rows -> ``Example`` objects.

Bad rows are never dropped silently. With ``on_bad_row: error`` (the default) loading stops with a ``DataError`` that
names the dataset, the row numbers and the problems; with ``on_bad_row: skip`` they are left out, counted, logged and
returned in ``EvalDataset.skipped`` so the run's summary can report them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from stoker.errors import ConfigError, DataError
from stoker.predict.dataset_info import DatasetSpec, get_dataset_spec, read_dataset_info
from stoker.predict.examples import Example, MediaResolver, RowProblem, convert_row
from stoker.predict.readers import local_files, read_rows

logger = logging.getLogger("stoker")

OnBadRow = Literal["skip", "error"]
_SHOWN = 5  # bad rows quoted in a message; the rest are counted


@dataclass(frozen=True)
class BadRow:
    dataset: str
    index: int
    reason: str

    def __str__(self) -> str:
        return f"row {self.index}: {self.reason}"


@dataclass
class EvalDataset:
    name: str
    spec: DatasetSpec
    examples: list[Example]
    skipped: list[BadRow] = field(default_factory=list)
    digest: str = ""  # identifies the data read (file bytes or hub id); part of the resume fingerprint
    origin: str = ""  # the file, folder or hub id, for messages
    rows_read: int = 0

    @property
    def labeled(self) -> bool:
        return any(e.label is not None for e in self.examples)


def load_datasets(
    names: Sequence[str],
    dataset_dir: str | Path,
    *,
    media_dir: str | Path | None = None,
    max_samples: int | None = None,
    on_bad_row: OnBadRow = "error",
    cache_dir: str | None = None,
    token: str | None = None,
) -> list[EvalDataset]:
    """Load each named dataset (``eval_dataset`` is a comma list; pass it split) in the order given."""
    names = [spec.name for spec in check_datasets(names, dataset_dir)]
    if on_bad_row not in ("skip", "error"):
        raise ConfigError(f"on_bad_row is {on_bad_row!r}; allowed: skip, error.", param="on_bad_row")
    info = read_dataset_info(dataset_dir)
    return [
        load_dataset(
            name,
            dataset_dir,
            info=info,
            media_dir=media_dir,
            max_samples=max_samples,
            on_bad_row=on_bad_row,
            cache_dir=cache_dir,
            token=token,
        )
        for name in names
    ]


def check_datasets(names: Sequence[str], dataset_dir: str | Path) -> list[DatasetSpec]:
    """What can be known before reading any row: every name is defined once, predictable, and its local files
    exist. Cheap (no data file is read), so every predict run checks this before the model loads."""
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ConfigError(
            "no dataset to predict on: set eval_dataset (or dataset) to one or more names from dataset_info.json.",
            param="eval_dataset",
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(
            f"eval_dataset lists {', '.join(repeated)} more than once; list each dataset once.", param="eval_dataset"
        )
    info = read_dataset_info(dataset_dir)
    specs = []
    for name in names:
        spec = get_dataset_spec(name, dataset_dir, info)
        _check_predictable(spec)
        if spec.source == "file":
            local_files(spec, dataset_dir)
        specs.append(spec)
    return specs


def load_dataset(
    name: str,
    dataset_dir: str | Path,
    *,
    info: dict[str, Any] | None = None,
    media_dir: str | Path | None = None,
    max_samples: int | None = None,
    on_bad_row: OnBadRow = "error",
    cache_dir: str | None = None,
    token: str | None = None,
) -> EvalDataset:
    """Load one dataset: its first ``num_samples`` rows (from dataset_info.json), then at most ``max_samples``."""
    spec = get_dataset_spec(name, dataset_dir, info)
    _check_predictable(spec)
    limits = [n for n in (spec.num_samples, max_samples) if n is not None]
    raw = read_rows(
        spec, dataset_dir, media_dir=media_dir, limit=min(limits) if limits else None, cache_dir=cache_dir, token=token
    )
    if not raw.rows:
        raise DataError(f"dataset {name!r} ({raw.origin}) has no rows.", param="eval_dataset")

    media = MediaResolver(raw.media_base)
    examples: list[Example] = []
    bad: list[BadRow] = []
    for index, row in enumerate(raw.rows):
        try:
            examples.append(convert_row(row, index, spec, media))
        except RowProblem as exc:
            bad.append(BadRow(name, index, str(exc)))

    if bad:
        listed = "; ".join(str(b) for b in bad[:_SHOWN])
        more = f"; and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
        summary = f"dataset {name!r} ({raw.origin}): {len(bad)} of {len(raw.rows)} rows are bad: {listed}{more}"
        if on_bad_row == "error":
            raise DataError(
                f"{summary}. Fix those rows, or set on_bad_row: skip to leave bad rows out (they are counted and "
                "reported).",
                param="eval_dataset",
            )
        logger.warning("%s. Skipped (on_bad_row: skip).", summary)
    if not examples:
        raise DataError(f"dataset {name!r} ({raw.origin}) has no usable rows: all were bad.", param="eval_dataset")
    return EvalDataset(name, spec, examples, bad, raw.digest, raw.origin, len(raw.rows))


def _check_predictable(spec: DatasetSpec) -> None:
    """Preference data has rated answers, not reference answers: there is nothing sound to score predictions on."""
    if spec.ranking:
        kind = "a preference (\"ranking\": true) dataset, for reward-model and DPO training"
    elif spec.column("kto_tag"):
        kind = "a KTO dataset (its answers are tagged good or bad)"
    else:
        return
    raise DataError(
        f"dataset {spec.name!r} is {kind}; predict needs a supervised dataset whose last assistant turn is the "
        "reference answer (alpaca, sharegpt or openai formatting, without \"ranking\" or a kto_tag column).",
        param="eval_dataset",
    )
