"""The stoker command: help, start-up cost, and user errors printed without tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def stoker(*args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stoker", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_help_lists_commands() -> None:
    out = stoker("--help")
    assert out.returncode == 0
    for command in ("chat", "webchat", "api", "predict", "train", "template", "demo"):
        assert f"\n  {command} " in out.stdout


def test_cli_import_is_light() -> None:
    code = "import sys, stoker.cli; heavy = {'torch', 'transformers', 'fastapi', 'gradio', 'vllm', 'yaml'}; print(sorted(heavy & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unknown_command_suggests() -> None:
    out = stoker("chatt")
    assert out.returncode == 2
    assert out.stderr == "stoker: error: unknown command 'chatt'. Did you mean 'chat'? Run 'stoker --help' for the list.\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model_name_or_path=/nonexistent/model"],
         "stoker: error: invalid value for model_name_or_path: the folder '/nonexistent/model' does not exist. "
         "Expected a local model folder or a Hugging Face hub id such as 'org/model'.\n"),
        (["model_name_or_path=x", "temperature=hot"],
         "stoker: error: invalid value for temperature: 'hot'; expected a number or null.\n"),
        (["missing.yaml"],
         f"stoker: error: config file not found: 'missing.yaml' (relative to the current folder, {ROOT}). Pass the "
         "path of a YAML file, e.g. examples/inference/demo.yaml.\n"),
        (["model_name_or_path=saves/demo/none"],
         f"stoker: error: invalid value for model_name_or_path: the folder 'saves/demo/none' (relative to the current "
         f"folder, {ROOT}) does not exist. Expected a local model folder or a Hugging Face hub id such as "
         "'org/model'.\n"),
    ],
)
def test_bad_config_exits_2_without_traceback(args: list[str], message: str) -> None:
    out = stoker("chat", *args)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.endswith(message)


def test_offline_hub_id_is_explained(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "stoker", "chat", "model_name_or_path=nobody/no-such-model"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert (
        "stoker: error: model_name_or_path: 'nobody/no-such-model' is not a local folder and is not in the Hugging "
        f"Face cache ({tmp_path}), and HF_HUB_OFFLINE is set." in out.stderr
    )


def test_train_without_predict_explains() -> None:
    out = stoker("train", "model_name_or_path=x")
    assert out.returncode == 2
    assert out.stderr.endswith(
        "stoker: error: nothing to do: set do_predict: true (with predict_with_generate: true) to run prediction.\n"
    )


def test_non_utf8_yaml_exits_2_naming_the_byte(tmp_path: Path) -> None:
    cfg = tmp_path / "latin1.yaml"
    cfg.write_bytes("model_name_or_path: x\n# caf\u00e9\n".encode("latin-1"))
    out = stoker("chat", str(cfg))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.endswith(
        f"stoker: error: {cfg} is not UTF-8 text: byte 27 (line 2) is 0xe9. "
        "Save the file as UTF-8 (most editors offer it under 'Save with encoding').\n"
    )


def test_each_command_has_its_own_help_and_there_is_a_version() -> None:
    from stoker import __version__

    texts = {}
    for command in ("chat", "webchat", "api", "predict", "train", "check", "version"):
        out = stoker(command, "--help")
        assert out.returncode == 0 and out.stdout.startswith(f"usage: stoker {command}"), out.stdout
        texts[command] = out.stdout
    assert len(set(texts.values())) == len(texts)  # not the top-level text again
    assert "/retry" in texts["chat"] and "API_KEY" in texts["api"] and "eval_dataset" in texts["predict"]
    assert "GRADIO_SERVER_PORT" in texts["webchat"] and "example:" in texts["chat"]
    for flag in ("--version", "-V", "version"):
        assert stoker(flag).stdout.strip() == __version__
