"""Similarity scores between predictions and labels, computed exactly as LLaMA-Factory's ``ComputeSimilarity``.

Per row: ROUGE-1, ROUGE-2 and ROUGE-L F-scores from ``rouge_chinese`` over jieba-segmented words, and BLEU-4 from
NLTK's ``sentence_bleu`` over characters with smoothing method 3; each x100 and rounded to 4 places. A row whose
prediction or label is blank scores 0 on every ROUGE. The reported value is the mean over rows (numpy's mean, as
LLaMA-Factory takes it), so numbers from both tools can be compared directly.

``jieba``, ``rouge_chinese`` and ``nltk`` are the ``metrics`` extra; they are imported on first use.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from stoker.errors import ConfigError

SIMILARITY_KEYS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")


@functools.cache
def _scorers() -> tuple[Any, Any, Any, Any]:
    try:
        with warnings.catch_warnings():  # jieba imports pkg_resources, which warns on import
            warnings.simplefilter("ignore", DeprecationWarning)
            import jieba
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
        from rouge_chinese import Rouge
    except ImportError as exc:
        raise ConfigError(
            f"scoring predictions needs jieba, nltk and rouge-chinese ({exc.name} is missing): install them with "
            "`pip install jieba nltk rouge-chinese` (or `pip install 'stoker[metrics]'`)."
        ) from exc
    jieba.setLogLevel(logging.WARNING)  # it announces its dictionary loading at INFO on first use
    return jieba, Rouge, sentence_bleu, SmoothingFunction().method3


def check_scorers() -> None:
    """Raise the ``ConfigError`` that scoring would raise, before hours of generation rather than after."""
    _scorers()


def similarity(predict: str, label: str) -> dict[str, float]:
    """The four scores of one row, each x100 and rounded to 4 places."""
    jieba, Rouge, sentence_bleu, method3 = _scorers()
    hypothesis = list(jieba.cut(predict))
    reference = list(jieba.cut(label))
    if not " ".join(hypothesis).split() or not " ".join(reference).split():
        rouge = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    else:
        scores = Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0]
        rouge = {key: scores[key]["f"] for key in ("rouge-1", "rouge-2", "rouge-l")}
    scores = {key: round(value * 100, 4) for key, value in rouge.items()}
    bleu = sentence_bleu([list(label)], list(predict), smoothing_function=method3)
    scores["bleu-4"] = round(bleu * 100, 4)
    return scores


def compute_similarity(predicts: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Mean of the per-row scores; ``{}`` when there are no rows."""
    if len(predicts) != len(labels):
        raise ValueError(f"{len(predicts)} predictions but {len(labels)} labels")
    if not predicts:
        return {}
    import numpy as np

    rows = [similarity(predict, label) for predict, label in zip(predicts, labels)]
    return {key: float(np.mean([row[key] for row in rows])) for key in SIMILARITY_KEYS}


def speed_metrics(prefix: str, runtime: float, num_samples: int, num_steps: int) -> dict[str, float]:
    """``<prefix>_runtime``, ``_samples_per_second``, ``_steps_per_second``, rounded as transformers' Trainer does."""
    result = {f"{prefix}_runtime": round(runtime, 4)}
    if runtime > 0:
        result[f"{prefix}_samples_per_second"] = round(num_samples / runtime, 3)
        result[f"{prefix}_steps_per_second"] = round(num_steps / runtime, 3)
    return result


def with_prefix(metrics: Mapping[str, float], prefix: str) -> dict[str, float]:
    """``{"bleu-4": x}`` -> ``{"<prefix>_bleu-4": x}``; e.g. prefix ``predict`` or ``predict_<dataset>``."""
    return {f"{prefix}_{key}": value for key, value in metrics.items()}
