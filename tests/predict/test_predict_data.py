"""Loading predict datasets: dataset_info.json entries, file formats, row conversion, bad rows.

Runs on LLaMA-Factory's shared demo data (read unchanged) and on small hand-made datasets with known answers.
"""

from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from stoker.errors import ConfigError, DataError
from stoker.predict.data import load_dataset, load_datasets
from stoker.predict.dataset_info import get_dataset_spec, read_dataset_info


@pytest.fixture(scope="module")
def lf_data(shared_dir: Path) -> Path:
    return shared_dir / "data" / "llamafactory"


def make_data(root: Path, info: dict[str, Any], files: dict[str, Any]) -> Path:
    """A dataset_dir with a dataset_info.json and data files (lists become JSON, strings are written as is)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if isinstance(content, str) else json.dumps(content, ensure_ascii=False), "utf-8")
    return root


# --- LLaMA-Factory's shared data, unchanged --------------------------------------------------------------------------


def test_every_local_entry_of_the_shared_dataset_info_loads_or_says_why(lf_data: Path) -> None:
    info = json.loads((lf_data / "dataset_info.json").read_text())
    local = [name for name, entry in info.items() if "file_name" in entry]
    assert len(local) == 14
    loaded, refused = {}, {}
    for name in local:
        try:
            loaded[name] = len(load_dataset(name, lf_data).examples)
        except DataError as exc:
            refused[name] = exc.message
    assert loaded == {
        "identity": 91,
        "alpaca_en_demo": 999,
        "alpaca_zh_demo": 1000,
        "glaive_toolcall_en_demo": 300,
        "glaive_toolcall_zh_demo": 300,
        "mllm_demo": 6,
        "mllm_audio_demo": 3,
        "mllm_video_demo": 3,
        "mllm_video_audio_demo": 3,
        "wiki_demo": 30,
        "c4_demo": 300,
    }
    assert sorted(refused) == ["dpo_en_demo", "dpo_zh_demo", "kto_en_demo"]
    assert "preference" in refused["dpo_en_demo"] and "predict needs a supervised dataset" in refused["dpo_en_demo"]
    assert "KTO" in refused["kto_en_demo"]


def test_alpaca_rows_join_instruction_and_input_with_a_newline(lf_data: Path) -> None:
    raw = json.loads((lf_data / "alpaca_en_demo.json").read_text())
    ds = load_dataset("alpaca_en_demo", lf_data)
    assert [e.index for e in ds.examples] == list(range(999))
    for row, ex in zip(raw, ds.examples):
        content = row["instruction"] + ("\n" + row["input"] if row["input"] else "")
        assert ex.messages == [{"role": "user", "content": content}]
        assert ex.label == row["output"]
        assert ex.dataset == "alpaca_en_demo" and ex.tools is None and ex.images == []
    with_input = next(i for i, row in enumerate(raw) if row["input"])
    assert "\n" in ds.examples[with_input].messages[0]["content"]


def test_identity_keeps_its_placeholders(lf_data: Path) -> None:
    ex = load_dataset("identity", lf_data).examples[0]
    assert ex.messages == [{"role": "user", "content": "hi"}]
    assert ex.label == "Hello! I am {{name}}, an AI assistant developed by {{author}}. How can I assist you today?"


def test_sharegpt_function_call_and_observation_become_tool_calls(lf_data: Path) -> None:
    raw = json.loads((lf_data / "glaive_toolcall_en_demo.json").read_text())[0]
    ex = load_dataset("glaive_toolcall_en_demo", lf_data, max_samples=1).examples[0]
    conv = [m["value"] for m in raw["conversations"]]
    assert ex.messages == [
        {"role": "user", "content": conv[0]},
        {"role": "assistant", "content": conv[1]},
        {"role": "user", "content": conv[2]},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_3_0",
                    "type": "function",
                    "function": {
                        "name": "search_recipes",
                        "arguments": '{"ingredients": ["chicken", "bell peppers", "rice"]}',
                    },
                }
            ],
        },
        {"role": "tool", "content": conv[4], "tool_call_id": "call_3_0"},
        {"role": "assistant", "content": conv[5]},
        {"role": "user", "content": conv[6]},
    ]
    assert ex.label == conv[7]
    assert ex.label_tool_calls is None
    assert ex.tools == [{"type": "function", "function": json.loads(raw["tools"])[0]}]


def test_sharegpt_empty_tools_list_means_no_tools(lf_data: Path) -> None:
    raw = json.loads((lf_data / "glaive_toolcall_en_demo.json").read_text())
    ds = load_dataset("glaive_toolcall_en_demo", lf_data)
    for row, ex in zip(raw, ds.examples):
        assert ex.tools == ([{"type": "function", "function": t} for t in json.loads(row["tools"])] or None)
    assert sum(ex.tools is None for ex in ds.examples) == sum(row["tools"] == "[]" for row in raw) > 0


def test_images_resolve_against_dataset_dir_and_match_placeholders(lf_data: Path) -> None:
    ex = load_dataset("mllm_demo", lf_data).examples[0]
    assert ex.messages == [
        {"role": "user", "content": "<image>Who are they?"},
        {"role": "assistant", "content": "They're Kane and Gretzka from Bayern Munich."},
        {"role": "user", "content": "What are they doing?<image>"},
    ]
    assert ex.label == "They are celebrating on the soccer field."
    assert ex.images == [str((lf_data / "mllm_demo_data" / "1.jpg").resolve())] * 2
    video = load_dataset("mllm_video_audio_demo", lf_data).examples[0]
    assert video.videos == [str((lf_data / "mllm_demo_data" / "4.mp4").resolve())]
    assert video.audios == [str((lf_data / "mllm_demo_data" / "4.mp3").resolve())]


def test_pretraining_text_has_no_label(lf_data: Path) -> None:
    lines = (lf_data / "wiki_demo.txt").read_text(encoding="utf-8").splitlines()
    ds = load_dataset("wiki_demo", lf_data)
    assert [e.messages for e in ds.examples] == [[{"role": "user", "content": line}] for line in lines]
    assert all(e.label is None for e in ds.examples) and not ds.labeled
    c4 = load_dataset("c4_demo", lf_data, max_samples=2).examples
    first = json.loads((lf_data / "c4_demo.jsonl").read_text().splitlines()[0])
    assert c4[0].messages == [{"role": "user", "content": first["text"]}] and c4[0].label is None


def test_max_samples_takes_the_first_rows_of_each_dataset(lf_data: Path) -> None:
    sets = load_datasets(["identity", "alpaca_en_demo"], lf_data, max_samples=3)
    assert [(d.name, [e.index for e in d.examples]) for d in sets] == [
        ("identity", [0, 1, 2]),
        ("alpaca_en_demo", [0, 1, 2]),
    ]


def test_hub_dataset_offline_fails_fast_and_clearly(lf_data: Path) -> None:
    # conftest sets HF_HUB_OFFLINE=1, as for every test; nothing is cached, so the loader must say so.
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        load_dataset("alpaca_en", lf_data)
    assert time.monotonic() - start < 20
    assert "'alpaca_en'" in err.value.message and "llamafactory/alpaca_en" in err.value.message
    assert "HF_HUB_OFFLINE" in err.value.message and "file_name" in err.value.message


def test_hub_dataset_without_network_fails_fast(lf_data: Path, tmp_path: Path) -> None:
    # Not in offline mode: the hub is probed first instead of letting the client retry for half a minute.
    code = (
        "from stoker.predict.data import load_dataset\n"
        "from stoker.errors import DataError\n"
        f"try:\n    load_dataset('alpaca_en', {str(lf_data)!r})\n"
        "except DataError as exc:\n    print(exc.message)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HF_ENDPOINT": "https://127.0.0.1:9", "HOME": str(tmp_path)}
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 20
    assert "comes from the Hugging Face hub (llamafactory/alpaca_en) but 127.0.0.1 is unreachable" in out.stdout


def test_modelscope_only_entry_is_refused_with_a_reason(lf_data: Path) -> None:
    with pytest.raises(DataError, match="ModelScope hub .*deepctrl/deepctrl-sft-data.*file_name"):
        load_dataset("deepctrl", lf_data)


def test_columns_object_unsets_unnamed_columns_like_llamafactory(lf_data: Path) -> None:
    c4 = get_dataset_spec("c4_demo", lf_data)
    assert (c4.column("prompt"), c4.column("query"), c4.column("response")) == ("text", None, None)
    default = get_dataset_spec("identity", lf_data)
    assert (default.column("prompt"), default.column("query"), default.column("response")) == (
        "instruction",
        "input",
        "output",
    )
    mllm = get_dataset_spec("mllm_demo", lf_data)
    assert mllm.tag("role_tag") == "role" and mllm.tag("observation_tag") is None


# --- hand-made datasets -------------------------------------------------------------------------------------------

QA = [
    {"instruction": "What is 2+2?", "input": "", "output": "4", "system": "Answer with a number."},
    {"instruction": "Capital of France?", "input": "One word.", "output": "Paris", "system": ""},
    {
        "instruction": "And of Italy?",
        "input": "",
        "output": "Rome",
        "history": [["Capital of France?", "Paris"]],
    },
]
QA_INFO = {
    "qa": {
        "file_name": "qa.json",
        "columns": {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
                    "history": "history"},
    }
}  # fmt: skip


def test_alpaca_system_and_history(tmp_path: Path) -> None:
    root = make_data(tmp_path, QA_INFO, {"qa.json": QA})
    ds = load_dataset("qa", root)
    assert [(e.messages, e.label) for e in ds.examples] == [
        ([{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "What is 2+2?"}], "4"),
        ([{"role": "user", "content": "Capital of France?\nOne word."}], "Paris"),
        (
            [
                {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris"},
                {"role": "user", "content": "And of Italy?"},
            ],
            "Rome",
        ),
    ]


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet", "arrow", "folder"])
def test_file_kinds_give_the_same_examples(tmp_path: Path, kind: str) -> None:
    rows = [{k: r.get(k, "") for k in ("instruction", "input", "output", "system")} for r in QA[:2]]
    info = {"qa": {"file_name": f"qa.{kind}" if kind != "folder" else "qa_dir"}}
    root = make_data(tmp_path, info, {})
    if kind == "jsonl":
        (root / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "csv":
        with open(root / "qa.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif kind in ("parquet", "arrow"):
        import pyarrow as pa
        import pyarrow.feather
        import pyarrow.parquet

        table = pa.Table.from_pylist(rows)
        if kind == "parquet":
            pyarrow.parquet.write_table(table, root / "qa.parquet")
        else:
            pyarrow.feather.write_feather(table, root / "qa.arrow", compression="uncompressed")
    else:  # two files, read in name order, indices continue across them
        (root / "qa_dir").mkdir()
        (root / "qa_dir" / "b.json").write_text(json.dumps(rows[1:]))
        (root / "qa_dir" / "a.json").write_text(json.dumps(rows[:1]))
    ds = load_dataset("qa", root)
    assert [(e.index, e.messages[-1]["content"], e.label) for e in ds.examples] == [
        (0, "What is 2+2?", "4"),
        (1, "Capital of France?\nOne word.", "Paris"),
    ]


ROME = '{"city": "Rome"}'


def test_openai_formatting_with_tool_calls(tmp_path: Path) -> None:
    rows = [
        {
            "messages": [
                {"role": "system", "content": "You can call tools."},
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "c1", "type": "function",
                                    "function": {"name": "weather", "arguments": {"city": "Paris"}}}],
                },  # fmt: skip
                {"role": "tool", "content": "18C", "tool_call_id": "c1"},
                {"role": "assistant", "content": [{"type": "text", "text": "It is 18C."}]},
            ],
            "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
        },
        {
            "messages": [
                {"role": "user", "content": "Weather in Rome?"},
                {"role": "assistant", "tool_calls": [{"function": {"name": "weather", "arguments": ROME}}]},
            ]
        },
    ]
    info = {"chat": {"file_name": "chat.json", "formatting": "openai",
                     "columns": {"messages": "messages", "tools": "tools"}}}  # fmt: skip
    root = make_data(tmp_path, info, {"chat.json": rows})
    first, second = load_dataset("chat", root).examples
    assert first.messages == [
        {"role": "system", "content": "You can call tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
            ],
        },
        {"role": "tool", "content": "18C", "tool_call_id": "c1"},
    ]
    assert first.label == "It is 18C." and first.label_tool_calls is None
    assert first.tools == rows[0]["tools"]
    assert second.label_tool_calls == [
        {"id": "call_1_0", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Rome"}'}}
    ]
    assert second.label == '[{"name": "weather", "arguments": "{\\"city\\": \\"Rome\\"}"}]'


def test_sharegpt_function_call_as_the_label(tmp_path: Path) -> None:
    rows = [
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Add 2 and 3."},
                {"from": "function_call", "value": '{"name": "add", "arguments": {"a": 2, "b": 3}}'},
            ]
        }
    ]
    root = make_data(tmp_path, {"calls": {"file_name": "c.json", "formatting": "sharegpt"}}, {"c.json": rows})
    ex = load_dataset("calls", root).examples[0]
    assert ex.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3."}]
    assert ex.label == '{"name": "add", "arguments": {"a": 2, "b": 3}}'
    assert ex.label_tool_calls == [
        {"id": "call_1_0", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
    ]


# --- bad rows --------------------------------------------------------------------------------------------------------

BAD_SHAREGPT = [
    {"conversations": [{"from": "human", "value": "ok"}, {"from": "gpt", "value": "fine"}]},
    {"conversations": [{"from": "gpt", "value": "I speak first"}, {"from": "human", "value": "no"}]},
    {"conversations": [{"from": "human", "value": "no answer"}]},
    {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": None}]},
    {"other": []},
    {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "not json"}]},
    {"conversations": [{"from": "human", "value": "ok again"}, {"from": "gpt", "value": "good"}]},
]


def test_bad_rows_stop_the_load_naming_dataset_rows_and_problems(tmp_path: Path) -> None:
    root = make_data(tmp_path, {"bad": {"file_name": "bad.json", "formatting": "sharegpt"}}, {"bad.json": BAD_SHAREGPT})
    with pytest.raises(DataError) as err:
        load_dataset("bad", root)
    assert err.value.message == (
        f"dataset 'bad' ({root / 'bad.json'}): 5 of 7 rows are bad: "
        "row 1: turn 0 has role 'gpt' where a user or observation turn is expected (roles must alternate); "
        "row 2: the conversation must end with an assistant turn (the answer to compare against); "
        "row 3: turn 1 (gpt) has no text under 'value'; "
        "row 4: missing column 'conversations'; "
        "row 5: turn 1 (function call) is not valid JSON (Expecting value). "
        "Fix those rows, or set on_bad_row: skip to leave bad rows out (they are counted and reported)."
    )


def test_skipped_bad_rows_are_counted_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_data(tmp_path, {"bad": {"file_name": "bad.json", "formatting": "sharegpt"}}, {"bad.json": BAD_SHAREGPT})
    with caplog.at_level(logging.WARNING, logger="stoker"):
        ds = load_dataset("bad", root, on_bad_row="skip")
    assert [(e.index, e.label) for e in ds.examples] == [(0, "fine"), (6, "good")]
    assert [(b.dataset, b.index) for b in ds.skipped] == [("bad", i) for i in (1, 2, 3, 4, 5)]
    assert ds.rows_read == 7
    assert "dataset 'bad'" in caplog.text and "5 of 7 rows are bad" in caplog.text and "Skipped" in caplog.text


def test_alpaca_missing_columns_and_broken_json_lines(tmp_path: Path) -> None:
    lines = [
        json.dumps({"instruction": "a", "output": "b"}),  # no input column: optional
        json.dumps({"instruction": "a"}),  # no output: bad
        '{"instruction": "broken",',  # not JSON
        json.dumps({"input": "x", "output": "y"}),  # no instruction: bad
        json.dumps({"instruction": 5, "output": "y"}),  # wrong type: bad
        json.dumps({"instruction": "h", "output": "y", "history": [["only one"]]}),  # bad history
    ]
    info = {"qa": {"file_name": "qa.jsonl", "columns": {"prompt": "instruction", "query": "input",
                                                        "response": "output", "history": "history"}}}  # fmt: skip
    root = make_data(tmp_path, info, {"qa.jsonl": "\n".join(lines) + "\n"})
    ds = load_dataset("qa", root, on_bad_row="skip")
    assert [e.index for e in ds.examples] == [0]
    assert [str(b) for b in ds.skipped] == [
        "row 1: missing column 'output'",
        "row 2: this line is not valid JSON (Expecting property name enclosed in double quotes at column 26)",
        "row 3: missing column 'instruction'",
        "row 4: column 'instruction' must be a string, got int",
        "row 5: column 'history': item 0 is not a [prompt, response] pair of strings",
    ]


def test_image_count_must_match_placeholders_and_files_must_exist(tmp_path: Path, lf_data: Path) -> None:
    rows = [
        {"messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "A cat."}],
         "images": ["1.jpg", "2.jpg"]},
        {"messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "A cat."}],
         "images": ["missing.jpg"]},
        {"messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "A cat."}],
         "images": ["1.jpg"]},
    ]  # fmt: skip
    info = {"vis": {"file_name": "vis.json", "formatting": "sharegpt", "columns": {"messages": "messages",
            "images": "images"}, "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
            "assistant_tag": "assistant"}}}  # fmt: skip
    root = make_data(tmp_path / "data", info, {"vis.json": rows})
    media = lf_data / "mllm_demo_data"
    ds = load_dataset("vis", root, media_dir=media, on_bad_row="skip")
    assert [str(b) for b in ds.skipped] == [
        "row 0: 2 images given but the conversation has 1 <image> placeholders; they must match one to one",
        f"row 1: image file 'missing.jpg' not found (looked in {media}); set media_dir to its folder",
    ]
    assert ds.examples[0].images == [str((media / "1.jpg").resolve())]


def test_config_mistakes_are_clear(tmp_path: Path, lf_data: Path) -> None:
    with pytest.raises(DataError, match="'alpaca_en_dem' is not defined .*Did you mean 'alpaca_en_demo'"):
        load_datasets(["alpaca_en_dem"], lf_data)
    with pytest.raises(ConfigError, match="lists identity more than once"):
        load_datasets(["identity", "identity"], lf_data)
    with pytest.raises(DataError, match="no dataset_info.json in dataset_dir .*does not exist"):
        load_datasets(["identity"], tmp_path / "nowhere")
    root = make_data(tmp_path / "d", {"x": {"file_name": "x.xml"}, "y": {"file_name": "y.json", "formatting": "csv"},
                                      "z": {"file_name": "z.json"}}, {"x.xml": "<a/>"})  # fmt: skip
    with pytest.raises(DataError, match="unsupported file type"):
        load_dataset("x", root)
    with pytest.raises(DataError, match="formatting 'csv'; allowed: alpaca, sharegpt, openai"):
        load_dataset("y", root)
    with pytest.raises(DataError, match="z.json does not exist"):
        load_dataset("z", root)
    (root / "z.json").write_text('[{"instruction": "a", "output": "b"},')
    with pytest.raises(DataError, match="z.json is not valid JSON: Expecting value at line 1"):
        load_dataset("z", root)


def test_digest_follows_the_data(tmp_path: Path) -> None:
    root = make_data(tmp_path, QA_INFO, {"qa.json": QA})
    first = load_dataset("qa", root).digest
    assert load_dataset("qa", root).digest == first
    (root / "qa.json").write_text(json.dumps(QA[:2]))
    assert load_dataset("qa", root).digest != first


def test_shared_dataset_info_is_read_unchanged(lf_data: Path) -> None:
    info = read_dataset_info(lf_data)
    assert info == json.loads((lf_data / "dataset_info.json").read_text())
