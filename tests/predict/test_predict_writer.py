"""Predict output: append-as-you-go parts, resume after a kill, config guard, ordered merge, results files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stoker.errors import ConfigError
from stoker.predict.writer import OUTPUT_KEYS, PredictionStore, save_metrics

FINGERPRINT = {"model_name_or_path": "demo", "max_new_tokens": 64, "eval_dataset": ["identity", "qa"]}
ORDER = [("identity", i) for i in range(5)] + [("qa", i) for i in range(3)]


def record(dataset: str, index: int) -> dict[str, object]:
    return {"prompt": f"p{index}", "predict": f"{dataset}-{index} ✓", "label": "l", "dataset": dataset,
            "index": index}  # fmt: skip


def expected_lines(order: list[tuple[str, int]]) -> list[str]:
    return [json.dumps(record(d, i), ensure_ascii=False) for d, i in order]


def test_fresh_run_writes_parts_then_an_ordered_final_file(tmp_path: Path) -> None:
    store = PredictionStore(tmp_path / "out", FINGERPRINT)
    store.prepare()
    assert json.loads(store.manifest_path.read_text())["fingerprint"] == FINGERPRINT
    with store.open_part(0) as part:
        for key in reversed(ORDER):  # finish order differs from dataset order
            part.write(record(*key))
    assert store.done_keys() == set(ORDER)
    merged = store.merge(ORDER)
    assert [(r["dataset"], r["index"]) for r in merged] == ORDER
    assert store.predictions_path.read_text(encoding="utf-8").splitlines() == expected_lines(ORDER)
    assert not store.parts_dir.exists()


def test_two_shards_merge_to_the_same_file_as_one(tmp_path: Path) -> None:
    single = PredictionStore(tmp_path / "one", FINGERPRINT)
    single.prepare()
    with single.open_part(0) as part:
        for key in ORDER:
            part.write(record(*key))
    single.merge(ORDER)

    sharded = PredictionStore(tmp_path / "two", FINGERPRINT)
    sharded.prepare()
    with sharded.open_part(0) as a, sharded.open_part(1) as b:
        for n, key in enumerate(ORDER):
            (a if n % 2 == 0 else b).write(record(*key))
    assert sorted(p.name for p in sharded.parts_dir.iterdir()) == ["part-00000.jsonl", "part-00001.jsonl"]
    sharded.merge(ORDER)
    assert sharded.predictions_path.read_bytes() == single.predictions_path.read_bytes()


def test_resume_skips_done_rows_and_a_torn_last_line(tmp_path: Path) -> None:
    store = PredictionStore(tmp_path, FINGERPRINT)
    store.prepare()
    with store.open_part(0) as part:
        for key in ORDER[:3]:
            part.write(record(*key))
    with open(store.part_path(0), "a", encoding="utf-8") as f:  # the process died halfway through a line
        f.write(json.dumps(record(*ORDER[3]))[:25])

    again = PredictionStore(tmp_path, dict(FINGERPRINT))
    again.prepare()
    assert again.done_keys() == set(ORDER[:3])
    with again.open_part(0) as part:
        for key in ORDER:
            if key not in again.done_keys():
                part.write(record(*key))
    again.merge(ORDER)
    assert again.predictions_path.read_text(encoding="utf-8").splitlines() == expected_lines(ORDER)


def test_killed_run_resumes_with_no_row_lost_or_duplicated(tmp_path: Path) -> None:
    script = f"""
import sys, time
from stoker.predict.writer import PredictionStore
store = PredictionStore({str(tmp_path)!r}, {FINGERPRINT!r})
store.prepare()
done = store.done_keys()
with store.open_part(0) as part:
    for i in range(400):
        if ("alpaca", i) in done:
            continue
        part.write({{"prompt": "p", "predict": "x" * 2000 + str(i), "label": "l", "dataset": "alpaca", "index": i}})
        time.sleep(0.002)
store.merge([("alpaca", i) for i in range(400)])
print("merged")
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    part = tmp_path / "predict_parts" / "part-00000.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not part.exists() or part.read_bytes().count(b"\n") < 50):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = part.read_bytes().count(b"\n")
    assert 50 <= written < 400, "the run must be killed part-way"
    assert not (tmp_path / "generated_predictions.jsonl").exists()

    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "merged"
    rows = [json.loads(line) for line in (tmp_path / "generated_predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(400))
    assert all(r["predict"] == "x" * 2000 + str(r["index"]) for r in rows)


def test_a_different_config_is_refused(tmp_path: Path) -> None:
    store = PredictionStore(tmp_path, FINGERPRINT)
    store.prepare()
    with store.open_part(0) as part:
        part.write(record("identity", 0))
    changed = {**FINGERPRINT, "max_new_tokens": 128, "temperature": 0.7}
    with pytest.raises(ConfigError) as err:
        PredictionStore(tmp_path, changed).prepare()
    assert err.value.message == (
        f"output_dir {tmp_path} holds predictions made with a different config (max_new_tokens: 64 -> 128; "
        "temperature: unset -> 0.7). Set overwrite_output_dir: true (or pass --overwrite) to start over, or choose "
        "another output_dir."
    )


def test_a_run_that_saved_no_row_is_replaced_by_a_different_config(tmp_path: Path) -> None:
    first = PredictionStore(tmp_path, FINGERPRINT)
    first.prepare()
    first.open_part(0).close()  # opened, nothing written: the run stopped before its first row
    changed = {**FINGERPRINT, "on_bad_row": "skip"}
    PredictionStore(tmp_path, changed).prepare()
    assert json.loads((tmp_path / "predict_manifest.json").read_text())["fingerprint"] == changed
    assert not (tmp_path / "predict_parts").exists()


def test_output_without_a_manifest_is_not_mixed_in(tmp_path: Path) -> None:
    (tmp_path / "generated_predictions.jsonl").write_text('{"prompt": "old", "predict": "x", "label": "y"}\n')
    with pytest.raises(ConfigError, match="already holds generated_predictions.jsonl from another run"):
        PredictionStore(tmp_path, FINGERPRINT).prepare()


def test_overwrite_starts_over_but_keeps_unrelated_files(tmp_path: Path) -> None:
    store = PredictionStore(tmp_path, FINGERPRINT)
    store.prepare()
    with store.open_part(0) as part:
        part.write(record("identity", 0))
    store.merge([("identity", 0)])
    save_metrics(tmp_path, {"predict_bleu-4": 1.0})
    (tmp_path / "adapter_config.json").write_text("{}")

    fresh = PredictionStore(tmp_path, {**FINGERPRINT, "max_new_tokens": 8})
    fresh.prepare(overwrite=True)
    assert fresh.done_keys() == set()
    assert not (tmp_path / "generated_predictions.jsonl").exists()
    assert not (tmp_path / "predict_results.json").exists()
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "all_results.json").exists()
    assert json.loads(fresh.manifest_path.read_text())["fingerprint"]["max_new_tokens"] == 8


def test_rerunning_a_finished_run_reuses_its_output(tmp_path: Path) -> None:
    store = PredictionStore(tmp_path, FINGERPRINT)
    store.prepare()
    with store.open_part(0) as part:
        for key in ORDER:
            part.write(record(*key))
    first = store.merge(ORDER)
    before = store.predictions_path.read_bytes()

    again = PredictionStore(tmp_path, FINGERPRINT)
    again.prepare()
    assert again.done_keys() == set(ORDER)
    assert again.merge(ORDER) == first
    assert again.predictions_path.read_bytes() == before


def test_merge_refuses_missing_rows_and_checks_records(tmp_path: Path) -> None:
    store = PredictionStore(tmp_path, FINGERPRINT)
    store.prepare()
    with store.open_part(0) as part:
        part.write(record("identity", 0))
        with pytest.raises(ValueError, match="needs 'dataset'"):
            part.write({"prompt": "p", "predict": "x", "label": "y"})
    missing = r"2 rows have no prediction yet \(first: 'identity' row 1, 'identity' row 2\)"
    with pytest.raises(RuntimeError, match=missing):
        store.merge([("identity", 0), ("identity", 1), ("identity", 2)])
    assert not store.predictions_path.exists()


def test_save_metrics_writes_results_and_merges_all_results(tmp_path: Path) -> None:
    (tmp_path / "all_results.json").write_text(json.dumps({"train_loss": 0.5, "predict_bleu-4": 0.0}))
    metrics = {"predict_rouge-1": 12.5, "predict_bleu-4": 10.25, "predict_runtime": 1.5}
    save_metrics(tmp_path, metrics)
    assert (tmp_path / "predict_results.json").read_text() == json.dumps(metrics, indent=4, sort_keys=True) + "\n"
    assert json.loads((tmp_path / "all_results.json").read_text()) == {"train_loss": 0.5, **metrics}
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_output_keys_are_settings_fields(tmp_path: Path) -> None:
    from stoker.config import Settings

    settings = Settings(eval_dataset=["identity"], max_new_tokens=64)
    fingerprint = settings.fingerprint(list(OUTPUT_KEYS))
    assert fingerprint["eval_dataset"] == ["identity"] and fingerprint["max_new_tokens"] == 64
    store = PredictionStore(tmp_path, fingerprint)
    store.prepare()
    with store.open_part(0) as part:
        part.write(record("identity", 0))
    changed = Settings(eval_dataset=["identity"], max_new_tokens=32).fingerprint(list(OUTPUT_KEYS))
    with pytest.raises(ConfigError, match="max_new_tokens: 64 -> 32"):
        PredictionStore(tmp_path, changed).prepare()
