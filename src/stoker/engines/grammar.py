"""Structured outputs on the huggingface engine: xgrammar compiles a ``StructuredOutput`` for the model's vocabulary,
and each constrained row keeps a matcher that says which tokens may come next.

Compiling costs from a millisecond (a small schema) to seconds (a huge grammar), so it happens where the request is
prepared, off the event loop and off the step thread (``Grammars.compile`` through ``Engine.check_params``); equal
constraints share one compiled grammar (xgrammar's cache, keyed by the spec's text). The per-step cost is one bitmask
fill per constrained row (about 0.5 ms on SmolLM2's 49k vocabulary) and one masked write into the logits.
"""

from __future__ import annotations

import re
import threading
from typing import TYPE_CHECKING, Any

from stoker.engines.structured import StructuredOutput
from stoker.errors import RequestError, StokerError

if TYPE_CHECKING:
    import torch


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError:
        raise StokerError(
            "structured outputs (response_format json_schema / json_object, structured_outputs) need the xgrammar "
            "package: pip install xgrammar"
        ) from None
    return xgrammar


COMPACT = (",", ":")  # JSON separators; xgrammar 0.2.8 still allows a space after the comma


class Grammars:
    """The compiler for one tokenizer and logits width (the vocabulary the mask covers)."""

    def __init__(self, tokenizer: Any, logits_width: int, *, threads: int = 2):
        self._tokenizer = tokenizer
        self._width = logits_width
        self._threads = threads
        self._compiler: Any = None
        self._lock = threading.Lock()

    def _get_compiler(self) -> Any:
        with self._lock:  # building the vocabulary table takes ~0.5 s: once, on the first constrained request
            if self._compiler is None:
                xgr = _xgrammar()
                info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self._width)
                self._compiler = xgr.GrammarCompiler(info, max_threads=self._threads)
            return self._compiler

    def compile(self, spec: StructuredOutput) -> Any:
        """The compiled grammar, or a ``RequestError`` (400) saying why the constraint cannot be used."""
        compiler = self._get_compiler()
        try:
            # As vLLM compiles them with disable_any_whitespace (the vllm engine sets it), so both backends accept
            # the same outputs: compact JSON, and (xgrammar's strict mode) no properties beyond a schema's. With any
            # whitespace allowed, small models were seen writing newlines inside an array until max_tokens.
            if spec.kind == "json":
                return compiler.compile_json_schema(spec.spec, any_whitespace=False, separators=COMPACT)
            if spec.kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, separators=COMPACT)
            if spec.kind == "regex":
                return compiler.compile_regex(spec.spec)
            if spec.kind == "choice":
                return compiler.compile_grammar(choice_grammar(spec.choices))
            if is_lark(spec.spec):  # vLLM takes Lark grammars too (``rule: ...`` rather than ``rule ::= ...``)
                return compiler.compile_lark(spec.spec)
            return compiler.compile_grammar(spec.spec)
        except (RuntimeError, ValueError, TypeError) as exc:
            detail = " ".join(str(exc).split())[:500] or type(exc).__name__
            raise RequestError(f"{spec.param}: this {spec.describe()} cannot be used to constrain the output: "
                               f"{detail}", param=spec.param) from None

    def matcher(self, spec: StructuredOutput, stop_ids: list[int]) -> RowGrammar:
        return RowGrammar(self.compile(spec), stop_ids)


class RowGrammar:
    """One row's position in its grammar. The matcher ends on the row's own stop ids (eos, end-of-turn)."""

    def __init__(self, compiled: Any, stop_ids: list[int]):
        xgr = _xgrammar()
        self._matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=list(stop_ids) or None)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> None:
        if not self._matcher.is_terminated():
            self._matcher.accept_token(token_id)


def mask_rows(logits: torch.Tensor, grammars: list[tuple[int, RowGrammar]]) -> None:
    """Set to -inf, in place, every token the grammar of row ``i`` does not allow next."""
    xgr = _xgrammar()
    bitmask = xgr.allocate_token_bitmask(len(grammars), logits.shape[-1])
    for j, (_, grammar) in enumerate(grammars):
        grammar.fill(bitmask, j)
    rows = [i for i, _ in grammars]
    sub = logits[rows]
    xgr.apply_token_bitmask_inplace(sub, bitmask)
    logits[rows] = sub


_LARK_RULE = re.compile(r"^\s*[?!]?[A-Za-z_][\w.]*\s*:(?!:=)", re.MULTILINE)


def is_lark(grammar: str) -> bool:
    """A grammar written in Lark's syntax: rules defined with ``:`` and none with ``::=``."""
    return "::=" not in grammar and _LARK_RULE.search(grammar) is not None


def literal(text: str) -> str:
    """``text`` as an EBNF string literal."""
    out = []
    for ch in text:
        if ch in '\\"':
            out.append("\\" + ch)
        elif ch in "\n\r\t":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose only sentences are ``choices``."""
    return "root ::= " + " | ".join(literal(c) for c in choices)


def framed_json_grammar(frames: list[tuple[str, str, str]]) -> str:
    """An EBNF grammar for one of ``frames`` (text before, a JSON schema's text, text after): a tool call in the
    model's own format, its arguments valid against the tool's parameters. The arguments are spaced as
    ``json.dumps`` spaces them, which is how tool formats write calls into training data. Printed as text so that
    both backends compile the same grammar (vLLM takes it as ``structured_outputs.grammar``)."""
    xgr = _xgrammar()
    options = []
    for before, schema, after in frames:
        parts = [xgr.Grammar.from_ebnf("root ::= " + literal(before))] if before else []
        parts.append(xgr.Grammar.from_json_schema(schema, any_whitespace=False, separators=(", ", ": ")))
        if after:
            parts.append(xgr.Grammar.from_ebnf("root ::= " + literal(after)))
        options.append(xgr.Grammar.concat(*parts) if len(parts) > 1 else parts[0])
    return str(xgr.Grammar.union(*options) if len(options) > 1 else options[0])
