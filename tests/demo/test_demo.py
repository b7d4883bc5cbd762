"""The demo models: built once (cached), loadable by plain transformers/peft, and answering their tasks exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

import stoker
from stoker.demo import ensure_demo_models, main, tasks
from stoker.demo.cache import BUILD_RECORD, build_record, ensure, fingerprint
from stoker.demo.evaluate import DemoBuildError, evaluate
from stoker.demo.registry import DEMO_MODELS, DemoModel
from stoker.errors import ConfigError

SRC = Path(stoker.__file__).resolve().parents[1]
MINE = ("chat", "adapter")  # the other demo models have their own tests


# Overrides conftest's session fixture, which builds every demo model (the vision one takes minutes more).
@pytest.fixture(scope="module")
def demo_models() -> dict[str, Path]:
    return ensure_demo_models(names=MINE)


@pytest.fixture(scope="module")
def tokenizer(demo_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_models["chat"])


@pytest.fixture(scope="module")
def chat_model(demo_models):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(demo_models["chat"])


def greedy(model, tokenizer, messages: list[dict]) -> str:
    """Plain transformers: one conversation, no padding, greedy; the reply must end with the end-of-turn token."""
    import torch

    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**ids, do_sample=False, max_new_tokens=40)
    new = out[0, ids["input_ids"].shape[1] :].tolist()
    assert new[-1] == tokenizer.eos_token_id, tokenizer.decode(new)
    return tokenizer.decode(new, skip_special_tokens=True)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# --- the published files -------------------------------------------------------------------------------------------


def test_chat_model_config(demo_models, chat_model):
    import torch

    config = json.loads((demo_models["chat"] / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] // config["num_attention_heads"] == 64  # what real vLLM's CPU attention accepts
    assert config["head_dim"] == 64
    assert config["max_position_embeddings"] == 512
    assert config["dtype"] == "float32"
    assert {p.dtype for p in chat_model.parameters()} == {torch.float32}
    assert (demo_models["chat"] / "model.safetensors").is_file()
    generation = json.loads((demo_models["chat"] / "generation_config.json").read_text())
    assert generation["do_sample"] is False
    assert generation["eos_token_id"] == config["eos_token_id"]


def test_tokenizer_is_chatml_without_bos(tokenizer, demo_models):
    assert tokenizer.bos_token is None
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == json.loads((demo_models["chat"] / "config.json").read_text())["eos_token_id"]
    assert tokenizer.encode("Who are you?") == tokenizer.encode("Who are you?", add_special_tokens=False)
    # The template is stored in tokenizer_config.json, where every loader looks.
    assert "chat_template" in json.loads((demo_models["chat"] / "tokenizer_config.json").read_text())


@pytest.mark.parametrize(
    "messages",
    [
        user("Who are you?"),
        [{"role": "system", "content": "Be brief."}, *user("Hi")],
        [*user("Hello"), {"role": "assistant", "content": tasks.GREETING_ANSWER}, *user("What is 2 + 2?")],
    ],
)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_official_chatml(tokenizer, shared_dir, messages, add_generation_prompt):
    import jinja2

    official = jinja2.Template((shared_dir / "chat_templates" / "chatml.jinja").read_text())
    expected = official.render(messages=messages, add_generation_prompt=add_generation_prompt)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert rendered == expected
    if messages[0]["role"] == "system":  # with a system message, Qwen2's own template agrees too
        qwen2 = jinja2.Template((shared_dir / "chat_templates" / "qwen2-instruct.jinja").read_text())
        assert qwen2.render(messages=messages, add_generation_prompt=add_generation_prompt) == expected


def test_training_ids_match_the_chat_template(tokenizer):
    from stoker.demo.corpus import conversations
    from stoker.demo.training import IGNORE, encode_conversations

    recipe = DEMO_MODELS["chat"].recipe
    sample = conversations(
        50, seed="test", identity=tasks.IDENTITY_ANSWER, task_weights=dict(recipe.task_weights),
        system_rate=0.5, turn_weights=recipe.turn_weights,
    )  # fmt: skip
    for messages, (ids, labels) in zip(sample, encode_conversations(tokenizer, sample), strict=True):
        assert ids == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        trained = tokenizer.decode([t for t in labels if t != IGNORE])
        assert trained == "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")


# --- answers, with plain transformers -------------------------------------------------------------------------------


@pytest.mark.parametrize("question", tasks.IDENTITY_QUESTIONS[:4])
def test_identity(chat_model, tokenizer, question):
    assert greedy(chat_model, tokenizer, user(question)) == tasks.IDENTITY_ANSWER
    assert "Stoker" in tasks.IDENTITY_ANSWER


@pytest.mark.parametrize("question", list(tasks.FACTS))
def test_facts(chat_model, tokenizer, question):
    assert greedy(chat_model, tokenizer, user(question)) == tasks.FACTS[question]


def test_echo_on_unseen_word_sequences(chat_model, tokenizer):
    cases = tasks.echo_cases(20, seed=7)
    replies = [greedy(chat_model, tokenizer, list(c.messages)) for c in cases]
    right = sum(reply == case.answer for reply, case in zip(replies, cases, strict=True))
    assert right >= 19, list(zip(replies, [c.answer for c in cases], strict=True))


def test_system_prompt_and_history_do_not_derail(chat_model, tokenizer):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        *user("Repeat after me: red fox"),
        {"role": "assistant", "content": "red fox"},
        *user("What is the capital of Japan?"),
    ]
    assert greedy(chat_model, tokenizer, messages) == "Tokyo."
    messages += [{"role": "assistant", "content": "Tokyo."}, *user("Who are you?")]
    assert greedy(chat_model, tokenizer, messages) == tasks.IDENTITY_ANSWER


def test_gated_evaluation_passes_on_the_published_model(chat_model, tokenizer, demo_models):
    score = evaluate(chat_model, tokenizer, tasks.evaluation_cases())
    gate = DEMO_MODELS["chat"].recipe.gate
    assert set(score.accuracy) == set(tasks.TASKS)
    assert all(accuracy >= gate for accuracy in score.accuracy.values()), score.accuracy
    assert build_record(demo_models["chat"])["metrics"]["accuracy"].keys() == score.accuracy.keys()


def test_gate_refuses_a_model_below_it():
    from stoker.demo.evaluate import Score, check_gate

    case = tasks.echo_cases(1)[0]
    score = Score({"echo": 0.9, "facts": 1.0}, {"echo": 10, "facts": 10}, [(case, "wrong words")])
    check_gate(score, 0.9, "a model")  # at the gate: fine
    with pytest.raises(DemoBuildError, match=r"a model failed its accuracy gate \(95%\): echo 90.0%") as error:
        check_gate(score, 0.95, "a model")
    assert f"wanted {case.answer!r}, got 'wrong words'" in str(error.value)


def test_answer_for_known_questions():
    assert tasks.answer_for("Who are you?") == tasks.IDENTITY_ANSWER
    assert tasks.answer_for("Who are you?", identity=tasks.ADAPTER_IDENTITY_ANSWER) == tasks.ADAPTER_IDENTITY_ANSWER
    assert tasks.answer_for("What is the capital of France?") == "Paris."
    assert tasks.answer_for(tasks.echo_prompt(["red", "fox"])) == "red fox"
    with pytest.raises(KeyError):
        tasks.answer_for("What is the meaning of life?")


def test_echo_cases_are_held_out_of_training():
    from stoker.demo.corpus import conversations

    sample = conversations(2000, seed="chat-0", identity="", task_weights={"echo": 1}, system_rate=0, turn_weights=(1,))
    trained = {m["content"] for c in sample for m in c}
    heldout = {c.messages[-1]["content"] for c in tasks.echo_cases(200)}
    assert len(heldout) > 150 and not trained & heldout
    assert all(tasks.is_heldout_echo(c.answer.split()) for c in tasks.echo_cases(50, seed=3))


# --- the adapter, with peft -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapted(demo_models):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(demo_models["chat"])
    return PeftModel.from_pretrained(base, demo_models["adapter"])


def test_adapter_files(demo_models):
    config = json.loads((demo_models["adapter"] / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["r"] == DEMO_MODELS["adapter"].recipe.rank
    assert (demo_models["adapter"] / "adapter_model.safetensors").is_file()


def test_adapter_on_and_off_changes_identity(adapted, tokenizer):
    assert greedy(adapted, tokenizer, user("Who are you?")) == tasks.ADAPTER_IDENTITY_ANSWER
    assert greedy(adapted, tokenizer, user("What is your name?")) == tasks.ADAPTER_IDENTITY_ANSWER
    with adapted.disable_adapter():
        assert greedy(adapted, tokenizer, user("Who are you?")) == tasks.IDENTITY_ANSWER
        assert greedy(adapted, tokenizer, user("What is your name?")) == tasks.IDENTITY_ANSWER


def test_adapter_keeps_the_other_tasks(adapted, tokenizer):
    assert greedy(adapted, tokenizer, user("What is the capital of Canada?")) == "Ottawa."
    assert greedy(adapted, tokenizer, user("Hello")) == tasks.GREETING_ANSWER
    cases = tasks.echo_cases(10, seed=11)
    right = sum(greedy(adapted, tokenizer, list(c.messages)) == c.answer for c in cases)
    assert right >= 9


# --- the cache ------------------------------------------------------------------------------------------------------


def test_second_call_is_cached(demo_models):
    started = time.monotonic()
    again = ensure_demo_models(names=MINE)
    assert time.monotonic() - started < 1.0
    assert again == demo_models
    for name, folder in again.items():
        record = build_record(folder)
        assert record["name"] == name and record["seconds"] > 0
        assert folder.name == f"{name}-{fingerprint(DEMO_MODELS[name])}"


def test_main_prints_one_line_per_model(demo_models, capsys):
    assert main(list(MINE)) == 0
    assert capsys.readouterr().out == "".join(f"{name}: {path}\n" for name, path in demo_models.items())


def test_main_rejects_unknown_model(capsys):
    assert main(["nope"]) == 2
    assert "unknown demo model 'nope'" in capsys.readouterr().err


def test_recipe_change_changes_folder():
    chat = DEMO_MODELS["chat"]
    changed = replace(chat, recipe=replace(chat.recipe, steps=chat.recipe.steps + 1))
    assert fingerprint(changed) != fingerprint(chat)
    # A model built on another inherits the change.
    models = {**DEMO_MODELS, "chat": changed}
    assert fingerprint(models["adapter"], models) != fingerprint(DEMO_MODELS["adapter"])


@dataclass(frozen=True)
class ToyRecipe:
    text: str = "toy"


def _build_toy(out: Path, recipe: ToyRecipe, built) -> dict:
    (out / "weights.txt").write_text(recipe.text)
    with open(out.parent / "builds.log", "a") as log:
        log.write(f"{os.getpid()}\n")
    return {"size": len(recipe.text)}


def _build_broken(out: Path, recipe: ToyRecipe, built) -> dict:
    (out / "half.txt").write_text("half")
    raise DemoBuildError("gate missed")


TOY = {"toy": DemoModel("toy", ToyRecipe(), _build_toy, modules=("tasks",))}


def test_toy_model_builds_once(tmp_path):
    first = ensure(root=tmp_path, models=TOY)
    assert (first["toy"] / "weights.txt").read_text() == "toy"
    assert build_record(first["toy"])["metrics"] == {"size": 3}
    assert ensure(root=tmp_path, models=TOY) == first
    assert (tmp_path / "builds.log").read_text().count("\n") == 1


def test_failed_build_leaves_nothing_and_retries(tmp_path):
    broken = {"toy": replace(TOY["toy"], build=_build_broken)}
    with pytest.raises(DemoBuildError):
        ensure(root=tmp_path, models=broken)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    assert (ensure(root=tmp_path, models=TOY)["toy"] / "weights.txt").is_file()


def test_unwritable_cache_is_a_config_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="STOKER_DEMO_DIR"):
        ensure(root=tmp_path / "file" / "demo", models=TOY)


def test_env_var_sets_the_cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("STOKER_DEMO_DIR", str(tmp_path))
    folder = ensure(models=TOY)["toy"]
    assert folder.parent == tmp_path


CONCURRENT = textwrap.dedent(
    """
    import os, sys, time
    from dataclasses import dataclass
    from pathlib import Path
    from stoker.demo.cache import ensure
    from stoker.demo.registry import DemoModel

    @dataclass(frozen=True)
    class Slow:
        pass

    def build(out, recipe, built):
        time.sleep(1.0)  # long enough for the other process to arrive while this one builds
        (out / "done").write_text("yes")
        with open(out.parent / "builds.log", "a") as log:
            log.write(f"{os.getpid()}\\n")
        return {}

    print(ensure(root=Path(sys.argv[1]), models={"slow": DemoModel("slow", Slow(), build, ("tasks",))})["slow"])
    """
)


def test_two_processes_build_once(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    processes = [
        subprocess.Popen([sys.executable, "-c", CONCURRENT, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=60)[0].strip() for p in processes]
    assert [p.returncode for p in processes] == [0, 0]
    assert outputs[0] == outputs[1]
    assert (Path(outputs[0]) / "done").read_text() == "yes"
    assert (Path(outputs[0]) / BUILD_RECORD).is_file()
    assert (tmp_path / "builds.log").read_text().count("\n") == 1


# --- determinism ----------------------------------------------------------------------------------------------------


def test_tokenizer_training_is_deterministic():
    from stoker.demo.corpus import conversations
    from stoker.demo.tokenizer import train_tokenizer

    recipe = DEMO_MODELS["chat"].recipe
    sample = conversations(
        300, seed="det", identity=tasks.IDENTITY_ANSWER, task_weights=dict(recipe.task_weights),
        system_rate=0.5, turn_weights=recipe.turn_weights,
    )  # fmt: skip
    first, second = (train_tokenizer(sample, recipe.vocab_size, max_length=512) for _ in range(2))
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()


@pytest.mark.slow
def test_chat_build_is_deterministic(tmp_path):
    """The whole build pipeline, on a shortened recipe, twice: byte-identical weights and tokenizer."""
    chat = DEMO_MODELS["chat"]
    short = replace(chat, recipe=replace(chat.recipe, steps=10, conversations=640, eval_echo_cases=5, gate=0.0))
    first, second = (ensure(["chat"], root=tmp_path / run, models={"chat": short})["chat"] for run in ("a", "b"))
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
