"""The ``stoker`` command. Heavy libraries are imported inside the command that needs them, so --help is instant."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from stoker import __version__
from stoker.errors import StokerError
from stoker.logs import logger, setup_logging

USAGE = f"""\
stoker {__version__}: one YAML file drives chat, web chat, an OpenAI-compatible API and batch prediction.

usage: stoker COMMAND [CONFIG.yaml] [key=value ...] [--key value ...] [--debug]

commands:
  chat       terminal chat, streamed token by token, with history
  webchat    chat in the browser (Gradio)
  api        OpenAI-compatible HTTP server (API_HOST, API_PORT, API_KEY)
  predict    batch generation over datasets: predictions file plus BLEU/ROUGE metrics
  train      LLaMA-Factory compatibility: runs predict when the config says do_predict: true
  check      print the resolved settings, where each came from, and what would load (loads nothing)
  template   list templates, or render the exact prompt a model sees
  demo       build the demo models (cached) and print their folders
  version    print the version (also --version)

stoker COMMAND --help tells what a command does, its config keys, environment variables and an example.
Without a CONFIG file, chat/webchat/api/predict use the demo model demo:smol (SmolLM2-135M-Instruct).
key=value overrides come after the file and are typed as YAML (e.g. temperature=0.7 adapter_name_or_path=a,b).
Docs: README.md and docs/ in the source tree.
"""



CONFIG_SUFFIXES = (".yaml", ".yml")
DEFAULT_MODEL = "demo:smol"  # a real instruct model, installed by the set-up (see stoker.demo.smol)
DEMO_PREDICT = {"eval_dataset": ["identity", "alpaca_en_demo"], "max_samples": 50, "output_dir": "saves/demo/predict"}


def split_config_args(args: list[str]) -> tuple[str | None, str | None, list[str]]:
    """(config file, model, overrides) from the arguments after the command.

    The first argument, when it is neither an option nor key=value, is a config file (``*.yaml``), or else a model:
    a folder, a hub id or a ``demo:`` name, as with Ollama's ``run`` (``stoker chat org/model``)."""
    if not args or args[0].startswith("-") or "=" in args[0]:
        return None, None, args
    first, rest = args[0], args[1:]
    if first.endswith(CONFIG_SUFFIXES) or (Path(first).is_file() and not first.endswith(".gguf")):
        return first, None, rest
    if Path(first).expanduser().is_dir() or first.startswith("demo:") or first.endswith(".gguf") or \
            first.count("/") == 1:
        return None, first, rest
    return first, None, rest  # neither a config nor a model: "config file not found" says what was looked for


def load_command_settings(args: list[str], command: str = "chat"):  # -> Settings (typed lazily: light imports)
    from stoker.config import load_settings, parse_overrides

    path, model, rest = split_config_args(args)
    overrides = parse_overrides(rest)
    if model is not None:
        overrides = {"model_name_or_path": model, **overrides}
    settings = load_settings(path, overrides)
    if settings.model_name_or_path is None:
        logger.info("no model_name_or_path given: using the demo model %s (SmolLM2-135M-Instruct)", DEFAULT_MODEL)
        settings.model_name_or_path = DEFAULT_MODEL
        settings.origins["model_name_or_path"] = "default (the demo model)"
    if command == "predict" and path is None:
        _demo_predict_defaults(settings)
    return settings


def _demo_predict_defaults(settings) -> None:  # noqa: ANN001
    """``stoker predict`` without a config: LLaMA-Factory's demo datasets shipped in the repository's data/ (found
    from wherever it runs), 50 rows of each, into saves/demo/predict; keys given on the command line still win."""
    given = settings.origins
    if "eval_dataset" not in given and "dataset" not in given:
        for key, value in DEMO_PREDICT.items():
            if key not in given:
                setattr(settings, key, value)
                given[key] = "default (demo predict)"
    if "dataset_dir" not in given and not (Path(settings.dataset_dir) / "dataset_info.json").is_file():
        bundled = Path(__file__).resolve().parents[2] / "data"
        if (bundled / "dataset_info.json").is_file():
            settings.dataset_dir = str(bundled)
            given["dataset_dir"] = "default (the repository's data/)"


def checked_settings(args: list[str], command: str):  # -> Settings
    """The command's settings, checked before anything heavy loads (see ``stoker.preflight``)."""
    from stoker.preflight import preflight

    settings = load_command_settings(args, command)
    preflight(settings, command)  # type: ignore[arg-type]
    return settings


def cmd_chat(args: list[str]) -> int:
    from stoker.terminal import run_terminal_chat

    return run_terminal_chat(checked_settings(args, "chat"))


def cmd_webchat(args: list[str]) -> int:
    from stoker.webchat.app import run_webchat

    return run_webchat(checked_settings(args, "webchat"))


def cmd_api(args: list[str]) -> int:
    from stoker.server.app import run_api

    return run_api(checked_settings(args, "api"))


def cmd_check(args: list[str]) -> int:
    """Print the resolved settings, where each came from, and what would load; load nothing."""
    from stoker.preflight import report

    command = "chat"
    if args and args[0] in ("--for", "-f") and len(args) > 1:
        command, args = args[1], args[2:]
    if command not in ("chat", "webchat", "api", "predict"):
        from stoker.errors import ConfigError

        raise ConfigError(f"stoker check --for {command!r}: expected chat, webchat, api or predict.")
    settings = load_command_settings(args, command)
    if command == "predict":
        from stoker.predict.runner import engine_settings

        settings = engine_settings(settings)
    sys.stdout.write(report(settings, command))  # type: ignore[arg-type]
    return 0


def cmd_predict(args: list[str]) -> int:
    return _predict(load_command_settings(args, "predict"))


def _predict(settings):  # Settings -> exit code
    from stoker.predict.runner import engine_settings, run_predict
    from stoker.preflight import preflight

    preflight(engine_settings(settings), "predict")  # a bad config stops here, before any process or model starts
    if settings.compare:
        from stoker.predict.compare import run_compare

        return run_compare(settings)
    return run_predict(settings)


def cmd_train(args: list[str]) -> int:
    from stoker.errors import ConfigError

    settings = load_command_settings(args)
    if settings.do_train:
        raise ConfigError(
            "Stoker runs inference only; do_train: true asks for training. Train with LLaMA-Factory, then point "
            "adapter_name_or_path at the result (or set do_train: false and do_predict: true to predict)."
        )
    if not settings.do_predict:
        raise ConfigError("nothing to do: set do_predict: true (with predict_with_generate: true) to run prediction.")
    return _predict(settings)


def cmd_template(args: list[str]) -> int:
    from stoker.template_cli import main as template_main

    return template_main(args)


def cmd_demo(args: list[str]) -> int:
    from stoker.demo import main as demo_main

    return demo_main(args)


def cmd_version(args: list[str]) -> int:
    print(__version__)
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "chat": cmd_chat,
    "webchat": cmd_webchat,
    "api": cmd_api,
    "predict": cmd_predict,
    "train": cmd_train,
    "check": cmd_check,
    "template": cmd_template,
    "demo": cmd_demo,
    "version": cmd_version,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    if argv[0] in ("-V", "--version"):
        return cmd_version([])
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"stoker: error: unknown command {command!r}.{hint} Run 'stoker --help' for the list.", file=sys.stderr)
        return 2
    if command not in ("template", "demo") and any(a in ("-h", "--help") for a in rest):
        from stoker.command_help import HELP  # template and demo parse their own arguments

        print(HELP[command], end="")
        return 0
    setup_logging(debug)
    code = _run(command, rest, debug)
    # A torchrun worker of predict (the one command that joins a process group) leaves without interpreter teardown.
    ranks = sys.modules.get("stoker.predict.ranks")
    return ranks.end_process(code) if ranks is not None else code


def _run(command: str, rest: list[str], debug: bool) -> int:
    try:
        return COMMANDS[command](rest)
    except StokerError as exc:
        if debug:
            raise
        print(f"stoker: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `stoker template list | head`: the reader is gone, nothing left to say
        sys.stderr.close()
        return 0
