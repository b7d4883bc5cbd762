"""``stoker template``: list the templates, or print the exact prompt a model sees.

    stoker template list
    stoker template render NAME|cfg.yaml --messages conv.json [--tools tools.json] [--ids]
                           [--no-generation-prompt] [--enable-thinking true|false] [--tokenizer PATH]

``render`` writes the prompt text to stdout and nothing else (no trailing newline is added), BOS included as text
where the family writes it; ``--ids`` writes the token ids as a JSON list instead. With a cfg.yaml the template,
tokenizer, default_system and enable_thinking come from the config, as the chat service would use them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from stoker.chat.messages import with_default_system
from stoker.errors import StokerError, TemplateError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stoker template", description="List chat templates or render a prompt.")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="list the built-in templates")
    render = sub.add_parser("render", help="print the exact prompt text (or --ids) for a conversation")
    render.add_argument("target", metavar="NAME|cfg.yaml", help="a template name, 'auto', or a Stoker config file")
    render.add_argument("--messages", required=True, metavar="conv.json",
                        help='a JSON list of {"role", "content"} messages (or an object with "messages" and "tools")')
    render.add_argument("--tools", metavar="tools.json", help="a JSON list of OpenAI tool definitions")
    render.add_argument("--ids", action="store_true", help="print the token ids (JSON list) instead of the text")
    render.add_argument("--no-generation-prompt", action="store_true", help="do not open the assistant's turn")
    render.add_argument("--enable-thinking", choices=("true", "false"), help="reasoning on/off for thinking families")
    render.add_argument("--tokenizer", metavar="PATH", help="tokenizer folder (needed for --ids or 'auto' with a NAME)")
    return parser


def _read_json(path: str, what: str) -> Any:
    file = Path(path)
    if not file.is_file():
        raise TemplateError(f"{what} file {path!r} does not exist.")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TemplateError(f"{what} file {path!r} is not valid JSON: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateError(f"cannot read {what} file {path!r}: {exc}") from None


def _conversation(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    data = _read_json(args.messages, "messages")
    tools = None
    if isinstance(data, dict) and "messages" in data:  # an OpenAI request body works too
        data, tools = data["messages"], data.get("tools")
    if not isinstance(data, list) or not all(isinstance(m, dict) for m in data):
        raise TemplateError(
            f"messages file {args.messages!r} must hold a JSON list of {{\"role\", \"content\"}} objects."
        )
    if args.tools:
        tools = _read_json(args.tools, "tools")
    if tools is not None and not isinstance(tools, list):
        raise TemplateError("tools must be a JSON list of {\"type\": \"function\", \"function\": {...}} objects.")
    return data, tools or None


def _is_config(target: str) -> bool:
    return target.endswith((".yaml", ".yml")) or Path(target).is_file()


def _load_tokenizer(path: str) -> Any:
    from stoker.config import load_settings
    from stoker.models.loader import load_tokenizer

    return load_tokenizer(load_settings(None, {"model_name_or_path": path}))


def render(args: argparse.Namespace) -> int:
    from stoker.templates import get_template

    messages, tools = _conversation(args)
    thinking = None if args.enable_thinking is None else args.enable_thinking == "true"
    if _is_config(args.target):
        from stoker.config import load_settings
        from stoker.models.loader import load_tokenizer

        if not Path(args.target).is_file():
            raise TemplateError(f"config file {args.target!r} does not exist.")
        settings = load_settings(args.target)
        if settings.model_name_or_path is None:
            raise TemplateError(f"{args.target} sets no model_name_or_path, so there is no tokenizer to render with.")
        tokenizer = _load_tokenizer(args.tokenizer) if args.tokenizer else load_tokenizer(settings)
        name = settings.template
        messages = with_default_system(messages, settings.default_system)
        if thinking is None:
            thinking = settings.enable_thinking
    else:
        name = args.target
        tokenizer = _load_tokenizer(args.tokenizer) if args.tokenizer else None
        if tokenizer is None and args.ids:
            raise TemplateError(
                "--ids needs a tokenizer: pass --tokenizer PATH, or render a cfg.yaml instead of a name."
            )
    template = get_template(name, tokenizer)
    options = dict(tools=tools, add_generation_prompt=not args.no_generation_prompt, enable_thinking=thinking)
    if args.ids:
        print(json.dumps(template.encode(tokenizer, messages, **options)))
    else:
        sys.stdout.write(template.render(messages, **options))
        sys.stdout.flush()
    return 0


def list_(_: argparse.Namespace) -> int:
    from stoker.templates.registry import TEMPLATES

    width = max(map(len, TEMPLATES))
    for name in sorted(TEMPLATES):
        print(f"{name:<{width}}  {TEMPLATES[name].description}")
    print(f"{'auto':<{width}}  the tokenizer's own chat_template (the default when no template is set)")
    return 0


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed its usage message
        return int(exc.code or 0)
    try:
        return render(args) if args.action == "render" else list_(args)
    except StokerError as exc:
        print(f"stoker: error: {exc.message}", file=sys.stderr)
        return 2
