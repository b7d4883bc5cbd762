"""The ``stoker`` command. Heavy libraries are imported inside the command that needs them, so --help is instant."""

from __future__ import annotations

import sys
from collections.abc import Callable

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
  template   list templates, or render the exact prompt a model sees (stoker template --help)
  demo       build the demo models (cached) and print their folders
  version    print the version

Without a CONFIG file, chat/webchat/api/predict use the built-in demo chat model.
key=value overrides come after the file and are typed as YAML (e.g. temperature=0.7 adapter_name_or_path=a,b).
Docs: README.md and docs/ in the source tree.
"""



def split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    """The optional config file (a first argument that is neither an option nor key=value) and the overrides."""
    if args and not args[0].startswith("-") and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def load_command_settings(args: list[str]):  # -> Settings (typed lazily to keep imports light)
    from stoker.config import load_settings, parse_overrides

    path, rest = split_config_args(args)
    overrides = parse_overrides(rest)
    settings = load_settings(path, overrides)
    if settings.model_name_or_path is None:
        logger.info("no model_name_or_path given: using the demo chat model (demo:chat)")
        settings.model_name_or_path = "demo:chat"
    return settings


def cmd_chat(args: list[str]) -> int:
    from stoker.terminal import run_terminal_chat

    return run_terminal_chat(load_command_settings(args))


def cmd_webchat(args: list[str]) -> int:
    from stoker.webchat.app import run_webchat

    return run_webchat(load_command_settings(args))


def cmd_api(args: list[str]) -> int:
    from stoker.server.app import run_api

    return run_api(load_command_settings(args))


def cmd_predict(args: list[str]) -> int:
    from stoker.predict.runner import run_predict

    return run_predict(load_command_settings(args))


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
    from stoker.predict.runner import run_predict

    return run_predict(settings)


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
    if command != "template" and any(a in ("-h", "--help") for a in rest):
        print(USAGE, end="")
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
