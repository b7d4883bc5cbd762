"""``stoker predict`` end to end on the real demo model: answers, files, metrics, resume, guard, several processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import free_port

from stoker.cli import main as cli_main
from stoker.demo.tasks import (
    ADAPTER_IDENTITY_ANSWER,
    FACTS,
    GREETING_ANSWER,
    IDENTITY_ANSWER,
    echo_cases,
)
from stoker.demo.tokenizer import render_chatml
from stoker.chat.budget import prompt_limit, truncate

from conftest import ROOT  # noqa: E402
PYTHON = sys.executable
RESULT_KEYS = {"predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l", "predict_runtime",
               "predict_samples_per_second", "predict_steps_per_second"}  # fmt: skip
SPEED_KEYS = ("predict_runtime", "predict_samples_per_second", "predict_steps_per_second")


# --- a hand-made dataset folder whose answers the demo model was trained on -------------------------------------------

ECHOES = echo_cases(6, seed=7, min_words=2, max_words=4)
QA_ROWS = [
    {"instruction": "What is the capital of France?", "input": "", "output": FACTS["What is the capital of France?"]},
    {"instruction": "Who are you?", "input": "", "output": IDENTITY_ANSWER},
    {"instruction": "What is the opposite of hot?", "output": FACTS["What is the opposite of hot?"]},
    {"instruction": "Hello", "input": "", "output": GREETING_ANSWER},
    {"instruction": "What is the capital of Japan?", "input": "", "output": FACTS["What is the capital of Japan?"],
     "system": "Answer briefly."},
    {"instruction": "How many legs does a spider have?", "input": "",
     "output": FACTS["How many legs does a spider have?"]},
]  # fmt: skip
CHAT_ROWS = [
    {"conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": GREETING_ANSWER},
                       {"from": "human", "value": "What is the capital of Italy?"}, {"from": "gpt", "value": "Rome."}]},
    {"conversations": [{"from": "system", "value": "You are a helpful assistant."},
                       {"from": "human", "value": "What is your name?"}, {"from": "gpt", "value": IDENTITY_ANSWER}]},
    *({"conversations": [{"from": "human", "value": c.messages[-1]["content"]}, {"from": "gpt", "value": c.answer}]}
      for c in ECHOES),
]  # fmt: skip
OPENAI_ROWS = [
    {"messages": [{"role": "user", "content": "What is the capital of Kenya?"},
                  {"role": "assistant", "content": FACTS["What is the capital of Kenya?"]}]},
    {"messages": [{"role": "system", "content": "Be concise and accurate."},
                  {"role": "user", "content": "What color is the sky?"},
                  {"role": "assistant", "content": FACTS["What color is the sky?"]}]},
]  # fmt: skip
DATASETS = {"qa": QA_ROWS, "chats": CHAT_ROWS, "oa": OPENAI_ROWS}


def prompt_messages(name: str, row: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation before the answer, in OpenAI shape, written out independently of stoker.predict."""
    if name == "qa":
        system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        text = "\n".join(p for p in (row["instruction"], row.get("input")) if p)
        return [*system, {"role": "user", "content": text}]
    if name == "chats":
        roles = {"system": "system", "human": "user", "gpt": "assistant"}
        return [{"role": roles[t["from"]], "content": t["value"]} for t in row["conversations"][:-1]]
    return row["messages"][:-1]


def answer(name: str, row: dict[str, Any]) -> str:
    if name == "qa":
        return row["output"]
    if name == "chats":
        return row["conversations"][-1]["value"]
    return row["messages"][-1]["content"]


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    for name, rows in DATASETS.items():
        (folder / f"{name}.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    info = {
        "qa": {"file_name": "qa.json", "columns": {"prompt": "instruction", "query": "input", "response": "output",
                                                   "system": "system"}},
        "chats": {"file_name": "chats.json", "formatting": "sharegpt"},
        "oa": {"file_name": "oa.json", "formatting": "openai", "columns": {"messages": "messages"}},
    }  # fmt: skip
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    return folder


def write_config(path: Path, **keys: Any) -> Path:
    path.write_text(yaml.safe_dump(keys, sort_keys=False), encoding="utf-8")
    return path


def demo_config(tmp_path: Path, model: Path, data: Path, out: Path, **extra: Any) -> Path:
    keys = {"model_name_or_path": str(model), "dataset_dir": str(data), "eval_dataset": "qa,chats,oa",
            "max_new_tokens": 32, "output_dir": str(out), "per_device_eval_batch_size": 4, **extra}  # fmt: skip
    return write_config(tmp_path / f"{out.name}.yaml", **keys)


def write_many_chats(data: Path, *, seed: int) -> list[dict[str, Any]]:
    """Replace the ``chats`` dataset with 64 echo rows: enough for a run to be watched, killed or batched."""
    many = [{"conversations": [{"from": "human", "value": c.messages[-1]["content"]}, {"from": "gpt", "value": c.answer}]}
            for c in echo_cases(64, seed=seed, min_words=3, max_words=6)]  # fmt: skip
    (data / "chats.json").write_text(json.dumps(many), encoding="utf-8")
    return many


def lines(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()]


def results(out: Path) -> dict[str, float]:
    return json.loads((out / "predict_results.json").read_text(encoding="utf-8"))


def without_speed(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k not in SPEED_KEYS}


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NPROC_PER_NODE"):
        env.pop(key, None)
    return {**env, **extra}


# --- end to end ------------------------------------------------------------------------------------------------------


def test_hand_made_datasets_are_answered_exactly_and_scored(
    tmp_path: Path, demo_chat: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    config = demo_config(tmp_path, demo_chat, data_dir, out, eval_on_each_dataset=True)
    assert cli_main(["predict", str(config)]) == 0

    expected = [(name, i, row) for name, rows in DATASETS.items() for i, row in enumerate(rows)]
    got = lines(out)
    assert [(r["dataset"], r["index"]) for r in got] == [(name, i) for name, i, _ in expected]
    for record, (name, _, row) in zip(got, expected):
        assert list(record) == ["prompt", "predict", "label", "dataset", "index"]
        assert record["prompt"] == render_chatml(prompt_messages(name, row), add_generation_prompt=True)
        assert record["label"] == answer(name, row)
        assert record["predict"] == record["label"]  # the trained answers, exactly

    metrics = results(out)
    per_dataset = {f"predict_{name}_{m}" for name in DATASETS for m in ("bleu-4", "rouge-1", "rouge-2", "rouge-l")}
    assert set(metrics) == RESULT_KEYS | per_dataset
    assert {k: v for k, v in metrics.items() if k not in SPEED_KEYS} == dict.fromkeys(
        RESULT_KEYS - set(SPEED_KEYS) | per_dataset, 100.0
    )
    assert metrics["predict_steps_per_second"] > 0
    assert json.loads((out / "all_results.json").read_text()) == metrics
    assert not (out / "predict_parts").exists()
    log = capsys.readouterr().err
    assert f"predict: {len(expected)} rows written, {len(expected)} generated now" in log
    assert str(out / "generated_predictions.jsonl") in log


def test_llamafactory_demo_data_runs_and_matches_plain_transformers(
    tmp_path: Path, demo_chat: Path, shared_dir: Path
) -> None:
    """alpaca_en_demo, identity and a sharegpt set from LLaMA-Factory's own data folder; the demo model was not
    trained on them, so its answers are checked against plain transformers greedy decoding, token for token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lf_data = shared_dir / "data" / "llamafactory"
    out = tmp_path / "lf"
    names = ["alpaca_en_demo", "identity", "glaive_toolcall_en_demo"]
    config = write_config(tmp_path / "lf.yaml", model_name_or_path=str(demo_chat), dataset_dir=str(lf_data),
                          eval_dataset=",".join(names), max_samples=3, max_new_tokens=16, output_dir=str(out),
                          template="qwen", on_bad_row="skip")  # fmt: skip
    assert cli_main(["predict", str(config)]) == 0
    got = lines(out)
    assert [r["dataset"] for r in got] == [n for n in names for _ in range(3)]
    assert [r["index"] for r in got] == [0, 1, 2] * 3
    alpaca = json.loads((lf_data / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    assert [r["label"] for r in got[:3]] == [row["output"] for row in alpaca[:3]]
    identity = json.loads((lf_data / "identity.json").read_text(encoding="utf-8"))
    assert [r["label"] for r in got[3:6]] == [row["output"] for row in identity[:3]]  # {{name}} placeholders kept
    assert all(r["prompt"].endswith("<|im_start|>assistant\n") for r in got)
    assert set(results(out)) == RESULT_KEYS

    tokenizer = AutoTokenizer.from_pretrained(demo_chat)
    model = AutoModelForCausalLM.from_pretrained(demo_chat, dtype=torch.float32).eval()
    for record in got[:6]:
        ids = tokenizer(record["prompt"], add_special_tokens=False, return_tensors="pt").input_ids
        with torch.inference_mode():
            generated = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16,
                                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
        assert record["predict"] == text, record["prompt"]


def test_llamafactory_predict_yaml_runs_under_stoker_train(
    tmp_path: Path, demo_chat: Path, demo_adapter: Path, shared_dir: Path
) -> None:
    """LLaMA-Factory's documented predict YAML with only the model and adapter paths changed. It reads `data/` and
    writes `saves/...` relative to the working directory, as in LLaMA-Factory."""
    source = yaml.safe_load((ROOT / "examples" / "predict" / "llama3_lora_predict.yaml").read_text())
    source.update(model_name_or_path=str(demo_chat), adapter_name_or_path=str(demo_adapter))
    work = tmp_path / "work"
    work.mkdir()
    (work / "data").symlink_to(shared_dir / "data" / "llamafactory")
    config = write_config(work / "llama3_lora_predict.yaml", **source)
    # Fewer rows and tokens than the YAML asks for keep the test short; the file itself is unchanged.
    proc = subprocess.run([PYTHON, "-m", "stoker", "train", config.name, "max_samples=2", "max_new_tokens=8"],
                          cwd=work, env=subprocess_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = work / "saves" / "llama3-8b" / "lora" / "predict"
    got = lines(out)
    assert [(r["dataset"], r["index"]) for r in got] == [("identity", 0), ("identity", 1), ("alpaca_en_demo", 0),
                                                         ("alpaca_en_demo", 1)]  # fmt: skip
    # The llama3 template renders the prompt, as the YAML says. The demo tokenizer spells its markers as plain text
    # and has no BOS token, so no BOS is written (LLaMA-Factory, too, takes the BOS from the tokenizer).
    assert got[0]["prompt"] == "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    assert set(results(out)) == RESULT_KEYS
    assert set(json.loads((out / "all_results.json").read_text())) == RESULT_KEYS


# --- resume, and never mixing runs ---------------------------------------------------------------------------------


def test_a_killed_run_resumes_to_the_same_file_as_an_uninterrupted_one(
    tmp_path: Path, demo_chat: Path, data_dir: Path
) -> None:
    many = write_many_chats(data_dir, seed=3)
    # One row at a time: the run lasts long enough to be killed in the middle, even on a fast machine.
    keys = {"eval_dataset": "chats", "max_num_seqs": 1}

    whole = tmp_path / "whole"
    assert cli_main(["predict", str(demo_config(tmp_path, demo_chat, data_dir, whole, **keys))]) == 0

    out = tmp_path / "killed"
    config = demo_config(tmp_path, demo_chat, data_dir, out, **keys)
    part = out / "predict_parts" / "part-00000.jsonl"
    proc = subprocess.Popen([PYTHON, "-m", "stoker", "predict", str(config)], env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if part.exists() and part.read_text(encoding="utf-8").count("\n") >= 6:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        assert proc.wait(timeout=30) == -signal.SIGKILL, "the run ended before it could be killed"
    finally:
        if proc.poll() is None:
            proc.kill()
    saved = part.read_text(encoding="utf-8").count("\n")
    assert 6 <= saved < len(many)
    assert not (out / "generated_predictions.jsonl").exists()

    assert cli_main(["predict", str(config)]) == 0
    assert (out / "generated_predictions.jsonl").read_bytes() == (whole / "generated_predictions.jsonl").read_bytes()
    assert results(out)["predict_bleu-4"] == results(whole)["predict_bleu-4"] == 100.0
    # Only the rows the killed run had not saved were generated again.
    assert results(out)["predict_samples_per_second"] * results(out)["predict_runtime"] == pytest.approx(
        len(many) - saved, rel=0.01
    )


def test_batch_size_one_does_not_throttle_the_engine(
    tmp_path: Path, demo_chat: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """LLaMA-Factory's predict YAMLs say per_device_eval_batch_size: 1; outputs do not depend on the batch, so the
    engine still decodes up to max_num_seqs rows together, and writes what one row at a time writes."""
    write_many_chats(data_dir, seed=7)
    alone = tmp_path / "alone"
    assert cli_main(["predict", str(demo_config(tmp_path, demo_chat, data_dir, alone, eval_dataset="chats",
                                                max_num_seqs=1))]) == 0  # fmt: skip
    assert "; up to 1 rows decoded together)" in capsys.readouterr().err
    batched = tmp_path / "batched"
    assert cli_main(["predict", str(demo_config(tmp_path, demo_chat, data_dir, batched, eval_dataset="chats",
                                                per_device_eval_batch_size=1))]) == 0  # fmt: skip
    peak = int(capsys.readouterr().err.split("; up to ")[1].split(" rows decoded together")[0])
    assert 8 < peak <= 64
    assert (batched / "generated_predictions.jsonl").read_bytes() == (alone / "generated_predictions.jsonl").read_bytes()
    assert results(batched)["predict_steps_per_second"] == pytest.approx(
        64 / results(batched)["predict_runtime"], rel=0.05)  # steps still count batches of per_device_eval_batch_size


def test_retrained_weights_in_the_same_folder_are_refused(
    tmp_path: Path, demo_chat: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import os
    import shutil

    model = tmp_path / "model"
    shutil.copytree(demo_chat, model)
    out = tmp_path / "out"
    cfg = demo_config(tmp_path, model, data_dir, out, eval_dataset="oa", max_new_tokens=8)
    assert cli_main(["predict", str(cfg)]) == 0
    weights = model / "model.safetensors"
    info = weights.stat()
    os.utime(weights, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))  # saved again by a later training run
    capsys.readouterr()
    assert cli_main(["predict", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "holds predictions made with a different config (weights: " in err, err


def test_a_different_config_is_refused_and_overwrite_starts_over(
    tmp_path: Path, demo_chat: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    first = demo_config(tmp_path, demo_chat, data_dir, out, eval_dataset="oa", max_new_tokens=16)
    assert cli_main(["predict", str(first)]) == 0
    before = (out / "generated_predictions.jsonl").read_bytes()

    capsys.readouterr()
    assert cli_main(["predict", str(first), "max_new_tokens=12"]) == 2
    err = capsys.readouterr().err
    assert "holds predictions made with a different config (max_new_tokens: 16 -> 12)" in err
    assert "overwrite_output_dir: true (or pass --overwrite)" in err
    assert (out / "generated_predictions.jsonl").read_bytes() == before

    # The same config again: nothing left to generate, the files are rewritten identically.
    assert cli_main(["predict", str(first)]) == 0
    assert (out / "generated_predictions.jsonl").read_bytes() == before
    assert "0 generated now" in capsys.readouterr().err

    assert cli_main(["predict", str(first), "max_new_tokens=12", "--overwrite"]) == 0
    assert "2 generated now" in capsys.readouterr().err
    manifest = json.loads((out / "predict_manifest.json").read_text())
    assert manifest["fingerprint"]["max_new_tokens"] == 12
    assert cli_main(["predict", str(first), "overwrite_output_dir=true"]) == 0
    assert json.loads((out / "predict_manifest.json").read_text())["fingerprint"]["max_new_tokens"] == 16
    assert (out / "generated_predictions.jsonl").read_bytes() == before


# --- prompts -------------------------------------------------------------------------------------------------------


def test_truncation_keeps_the_end_and_a_leading_bos() -> None:
    assert truncate([1, 10, 11, 12, 13], 3, bos_id=1) == [1, 12, 13]
    assert truncate([10, 11, 12, 13], 3, bos_id=1) == [11, 12, 13]
    assert truncate([1, 10, 11], 3, bos_id=1) == [1, 10, 11]
    assert truncate([1, 10, 11, 12], 1, bos_id=1) == [12]
    assert truncate([5, 10, 11, 12], 2, bos_id=None) == [11, 12]
    # cutoff_len, and the answer keeps up to half the context.
    assert prompt_limit(2048, 512, 64) == 448
    assert prompt_limit(100, 512, 64) == 100
    assert prompt_limit(2048, 512, 1024) == 256


def test_long_prompts_are_cut_to_cutoff_len_from_the_front(
    tmp_path: Path, demo_chat: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_chat)
    out = tmp_path / "out"
    config = demo_config(tmp_path, demo_chat, data_dir, out, eval_dataset="chats", cutoff_len=14)
    assert cli_main(["predict", str(config)]) == 0
    cut = 0
    for record, row in zip(lines(out), CHAT_ROWS):
        full = tokenizer.encode(render_chatml(prompt_messages("chats", row), add_generation_prompt=True))
        assert record["prompt"] == tokenizer.decode(full[-14:], skip_special_tokens=False)
        assert record["prompt"].endswith("<|im_end|>\n<|im_start|>assistant\n")
        cut += len(full) > 14
    assert cut >= 2
    assert f"prompts cut to their last tokens to fit cutoff_len 14 and the context: {cut}" in capsys.readouterr().err


def test_rows_the_model_cannot_take_are_reported_or_skipped(
    tmp_path: Path, demo_chat: Path, data_dir: Path, shared_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(next((shared_dir / "images").rglob("*.jpg")), data_dir / "picture.jpg")
    rows = [*OPENAI_ROWS[:1], {"messages": [{"role": "user", "content": "<image>What is this?"},
                                            {"role": "assistant", "content": "A picture."}], "images": ["picture.jpg"]},
            OPENAI_ROWS[1]]  # fmt: skip
    (data_dir / "oa.json").write_text(json.dumps(rows), encoding="utf-8")
    info = json.loads((data_dir / "dataset_info.json").read_text())
    info["oa"]["columns"] = {"messages": "messages", "images": "images"}
    (data_dir / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")

    out = tmp_path / "out"
    config = demo_config(tmp_path, demo_chat, data_dir, out, eval_dataset="oa")
    assert cli_main(["predict", str(config)]) == 2
    err = capsys.readouterr().err
    assert "dataset 'oa': 1 row cannot be rendered: row 1: the model" in err
    assert "takes no images" in err and "on_bad_row: skip" in err
    assert not (out / "generated_predictions.jsonl").exists()

    assert cli_main(["predict", str(config), "on_bad_row=skip"]) == 0
    assert [(r["index"], r["predict"]) for r in lines(out)] == [(0, "Nairobi."), (2, "Blue.")]
    assert "predict: bad rows skipped (on_bad_row: skip): 1" in capsys.readouterr().err


def test_image_rows_are_answered_by_the_demo_vision_model(tmp_path: Path, demo_models: dict[str, Path]) -> None:
    """LLaMA-Factory's multimodal layout (mllm_demo: sharegpt with OpenAI-style tags and an images column)."""
    from stoker.demo.vision_tasks import QUESTIONS, answer, draw_shape

    data = tmp_path / "data"
    (data / "pictures").mkdir(parents=True)
    rows = []
    for n, (shape, color, task) in enumerate([("circle", "red", "shape"), ("square", "blue", "color"),
                                              ("triangle", "green", "describe")]):  # fmt: skip
        draw_shape(shape, color, size=64, seed=n).save(data / "pictures" / f"{n}.png")
        rows.append({"messages": [{"role": "user", "content": "<image>" + QUESTIONS[task][0]},
                                  {"role": "assistant", "content": answer(task, shape, color)}],
                     "images": [f"pictures/{n}.png"]})  # fmt: skip
    (data / "shapes.json").write_text(json.dumps(rows), encoding="utf-8")
    info = {"shapes": {"file_name": "shapes.json", "formatting": "sharegpt",
                       "columns": {"messages": "messages", "images": "images"},
                       "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                "assistant_tag": "assistant"}}}  # fmt: skip
    (data / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")

    out = tmp_path / "out"
    config = write_config(tmp_path / "vision.yaml", model_name_or_path=str(demo_models["vision"]),
                          dataset_dir=str(data), eval_dataset="shapes", max_new_tokens=16, output_dir=str(out))  # fmt: skip
    assert cli_main(["predict", str(config)]) == 0
    got = lines(out)
    assert [r["predict"] for r in got] == ["A circle.", "Blue.", "A green triangle."]
    assert [r["label"] for r in got] == [r["predict"] for r in got]


# --- several processes ---------------------------------------------------------------------------------------------


def test_two_processes_write_the_same_file_as_one(tmp_path: Path, demo_chat: Path, data_dir: Path) -> None:
    one = tmp_path / "one"
    assert cli_main(["predict", str(demo_config(tmp_path, demo_chat, data_dir, one))]) == 0

    two = tmp_path / "two"
    config = demo_config(tmp_path, demo_chat, data_dir, two)
    proc = subprocess.run([PYTHON, "-m", "stoker", "predict", str(config)], env=subprocess_env(NPROC_PER_NODE="2"),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "starting 2 worker processes" in proc.stderr
    assert proc.stderr.count("rows written") == 1  # one voice: the main process reports
    assert lines(two) == lines(one)
    assert (two / "generated_predictions.jsonl").read_bytes() == (one / "generated_predictions.jsonl").read_bytes()
    assert without_speed(results(two)) == without_speed(results(one))


@pytest.mark.slow
def test_torchrun_with_two_processes_writes_the_same_file_as_one(
    tmp_path: Path, demo_chat: Path, data_dir: Path
) -> None:
    torchrun = Path(PYTHON).with_name("torchrun")
    one = tmp_path / "one"
    assert cli_main(["predict", str(demo_config(tmp_path, demo_chat, data_dir, one, eval_dataset="qa,oa"))]) == 0
    two = tmp_path / "two"
    config = demo_config(tmp_path, demo_chat, data_dir, two, eval_dataset="qa,oa")
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                           str(free_port()), "-m", "stoker", "predict", str(config)],
                          env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert lines(two) == lines(one)
    assert (two / "generated_predictions.jsonl").read_bytes() == (one / "generated_predictions.jsonl").read_bytes()


def test_a_failure_on_one_process_is_reported_once(tmp_path: Path, demo_chat: Path, data_dir: Path) -> None:
    out = tmp_path / "out"
    config = demo_config(tmp_path, demo_chat, data_dir, out, eval_dataset="qa,missing")
    proc = subprocess.run([PYTHON, "-m", "stoker", "predict", str(config)], env=subprocess_env(NPROC_PER_NODE="2"),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.count("stoker: error: dataset 'missing' is not defined") == 1, proc.stderr


def test_a_process_that_joined_a_group_exits_at_once_with_its_output_flushed() -> None:
    from stoker.predict.ranks import end_process

    assert end_process(3) == 3  # this process joined no group: it exits the normal way
    # One that did skips interpreter teardown (atexit handlers never run) but loses nothing it printed or logged.
    script = ("import atexit, logging, sys\n"
              "import stoker.predict.ranks as ranks\n"
              "atexit.register(lambda: print('teardown ran'))\n"
              "logging.basicConfig(stream=sys.stderr)\n"
              "print('saved', end='')\n"
              "logging.getLogger('x').warning('logged')\n"
              "ranks._joined_a_group = True\n"
              "ranks.end_process(7)\n"
              "print('not reached')\n")  # fmt: skip
    proc = subprocess.run([PYTHON, "-c", script], env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (7, "saved")
    assert "logged" in proc.stderr


def test_worker_settings_survive_the_trip_through_json() -> None:
    from stoker.config import load_settings
    from stoker.predict.ranks import settings_from_json, settings_to_json

    settings = load_settings(None, {"model_name_or_path": "m", "eval_dataset": "a,b", "temperature": 0.5,
                                    "vllm_config": {"x": 1}, "max_samples": 3})  # fmt: skip
    assert settings_from_json(settings_to_json(settings)) == settings


def test_nproc_and_world_come_from_the_environment() -> None:
    from stoker.errors import ConfigError
    from stoker.predict.launch import plan_launch
    from stoker.predict.ranks import World, world_from_env

    def requested_processes(env: dict[str, str]) -> int:
        return plan_launch(env, 0, backend="huggingface").processes

    assert world_from_env({}) == World(0, 1, 0, 1)
    assert world_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}) == World(
        3, 4, 1, 2
    )
    assert [World(r, 3).owns(4) for r in range(3)] == [False, True, False]
    assert requested_processes({}) == 1
    assert requested_processes({"NPROC_PER_NODE": "3"}) == 3
    assert requested_processes({"NPROC_PER_NODE": "3", "WORLD_SIZE": "3"}) == 1  # already a worker
    with pytest.raises(ConfigError, match="NPROC_PER_NODE='two'"):
        requested_processes({"NPROC_PER_NODE": "two"})
    with pytest.raises(ConfigError, match="RANK=5 is outside WORLD_SIZE=2"):
        world_from_env({"WORLD_SIZE": "2", "RANK": "5"})


# --- one run per folder; no orphans --------------------------------------------------------------------------------


def test_a_second_run_on_a_busy_output_dir_is_refused_naming_the_first(
    tmp_path: Path, demo_chat: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from stoker.predict.dirlock import lock_output_dir

    out = tmp_path / "out"
    config = demo_config(tmp_path, demo_chat, data_dir, out, eval_dataset="qa")
    held = lock_output_dir(out)  # stands for a run in progress: the same lock a run takes
    assert held is not None
    try:
        assert cli_main(["predict", str(config)]) == 2
        err = capsys.readouterr().err
        assert f"output_dir {out} is in use by another predict run (process {os.getpid()}, started " in err
        assert "Wait for it to finish or stop it, or choose another output_dir." in err
        assert "Traceback" not in err and not (out / "predict_parts").exists()
    finally:
        held.release()
    assert cli_main(["predict", str(config)]) == 0  # the lock went with its holder


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(p) for p in (task / "children").read_text().split()]
    return found


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # a zombie has stopped; only its exit status waits for a reaper


def _wait_for_rows(proc: subprocess.Popen[str], parts: list[Path], at_least: int) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if all(p.exists() and p.read_text(encoding="utf-8").count("\n") >= at_least for p in parts):
            return
        time.sleep(0.02)
    raise AssertionError(f"the run ended or stalled before {at_least} rows per process were saved")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds worker processes through /proc")
def test_a_killed_launcher_or_worker_leaves_no_orphans_and_loses_no_rows(
    tmp_path: Path, demo_chat: Path, data_dir: Path
) -> None:
    write_many_chats(data_dir, seed=5)
    keys = {"eval_dataset": "chats", "max_num_seqs": 1}
    whole = tmp_path / "whole"
    assert cli_main(["predict", str(demo_config(tmp_path, demo_chat, data_dir, whole, **keys))]) == 0

    out = tmp_path / "out"
    config = demo_config(tmp_path, demo_chat, data_dir, out, **keys)
    parts = [out / "predict_parts" / f"part-{rank:05d}.jsonl" for rank in range(2)]
    command = [PYTHON, "-m", "stoker", "predict", str(config)]
    env = subprocess_env(NPROC_PER_NODE="2")

    # 1. The launcher is killed outright (no chance to clean up): its workers follow it instead of running on.
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    try:
        _wait_for_rows(launcher, parts, 2)
        workers = _children(launcher.pid)
        assert len(workers) == 2
        launcher.kill()
        assert launcher.wait(timeout=30) == -signal.SIGKILL
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(_gone(w) for w in workers):
            time.sleep(0.05)
        assert all(_gone(w) for w in workers), "worker processes outlived their launcher"
    finally:
        if launcher.poll() is None:
            launcher.kill()
    saved = sum(p.read_text(encoding="utf-8").count("\n") for p in parts)

    # 2. One worker dies without a word (as under the out-of-memory killer): the launcher stops the other and says so.
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # A worker that resumed with few rows left may finish before the other is killed; wait for new rows first.
        time.sleep(0.5)
        _wait_for_rows(launcher, parts, saved // 2 + 2)
        os.kill(_children(launcher.pid)[1], signal.SIGKILL)
        _, err = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 1, err
    assert ("stoker: error: predict worker 1 (of 2) died: killed by SIGKILL (often the out-of-memory killer); the "
            "other workers were stopped. The rows finished so far are saved: run the same command again to resume.") in err
    assert "Traceback" not in err
    assert not (out / "generated_predictions.jsonl").exists()

    # 3. The same command again resumes both parts to the file one uninterrupted run writes.
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "generated_predictions.jsonl").read_bytes() == (whole / "generated_predictions.jsonl").read_bytes()


# --- compare ---------------------------------------------------------------------------------------------------------


def test_compare_answers_with_the_base_and_the_adapter_in_one_run(
    tmp_path: Path, demo_chat: Path, demo_adapter: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each compared model writes the file a run of its own writes; the metrics come side by side."""
    out = tmp_path / "cmp"
    config = demo_config(tmp_path, demo_chat, data_dir, out, adapter_name_or_path=f"tuned={demo_adapter}",
                         compare="base,tuned")
    assert cli_main(["predict", str(config)]) == 0
    alone_base = tmp_path / "alone-base"
    assert cli_main(["predict", str(demo_config(tmp_path, demo_chat, data_dir, alone_base))]) == 0
    alone_tuned = tmp_path / "alone-tuned"
    assert cli_main(["predict", str(demo_config(tmp_path, demo_chat, data_dir, alone_tuned,
                                                adapter_name_or_path=str(demo_adapter)))]) == 0
    for label, alone in (("base", alone_base), ("tuned", alone_tuned)):
        assert [r["predict"] for r in lines(out / label)] == [r["predict"] for r in lines(alone)], label
        assert without_speed(results(out / label)) == without_speed(results(alone))
    by_model = {label: [r["predict"] for r in lines(out / label)] for label in ("base", "tuned")}
    assert IDENTITY_ANSWER in by_model["base"] and ADAPTER_IDENTITY_ANSWER in by_model["tuned"]
    table = json.loads((out / "compare_results.json").read_text())
    assert list(table) == ["base", "tuned"] and table["base"] == results(out / "base")
    log = capsys.readouterr().err
    assert "compare: metric" in log and "predict_bleu-4" in log


@pytest.mark.parametrize(("compare", "says"), [
    ("base,nope", "'nope' is neither base nor one of the adapters (tuned)"),
])
def test_compare_names_a_wrong_model(tmp_path: Path, demo_chat: Path, demo_adapter: Path, data_dir: Path,
                                     compare: str, says: str, capsys: pytest.CaptureFixture[str]) -> None:
    config = demo_config(tmp_path, demo_chat, data_dir, tmp_path / "bad", adapter_name_or_path=f"tuned={demo_adapter}",
                         compare=compare)
    assert cli_main(["predict", str(config)]) == 2
    assert says in capsys.readouterr().err
    no_adapter = demo_config(tmp_path, demo_chat, data_dir, tmp_path / "bad2", compare="base")
    assert cli_main(["predict", str(no_adapter)]) == 2
    assert "compare needs adapters to compare" in capsys.readouterr().err
