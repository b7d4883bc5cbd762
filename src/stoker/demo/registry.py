"""The demo models Stoker can build, what each depends on, and what shapes it (for its cache fingerprint).

A new demo model (e.g. a LLaVA-style ``vision`` model) is one more ``DemoModel`` in ``DEMO_MODELS``: a recipe
dataclass, a build function, the ``stoker.demo`` modules whose source shapes it, and the models it builds on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stoker.demo.recipes import AdapterRecipe, ChatRecipe
from stoker.demo.smol import SmolRecipe
from stoker.demo.smol_adapter import SmolAdapterRecipe
from stoker.demo.vision import VisionRecipe

# (output folder, recipe, folders of the models it requires) -> metrics worth recording.
Builder = Callable[[Path, Any, Mapping[str, Path]], dict[str, Any]]


@dataclass(frozen=True)
class DemoModel:
    name: str
    recipe: Any  # a frozen dataclass: its repr goes into the fingerprint
    build: Builder
    modules: tuple[str, ...]  # modules under stoker.demo whose source goes into the fingerprint
    requires: tuple[str, ...] = ()


def _build_chat(out: Path, recipe: ChatRecipe, built: Mapping[str, Path]) -> dict[str, Any]:
    from stoker.demo.chat import build_chat

    return build_chat(out, recipe)


def _build_adapter(out: Path, recipe: AdapterRecipe, built: Mapping[str, Path]) -> dict[str, Any]:
    from stoker.demo.adapter import build_adapter

    return build_adapter(out, recipe, built["chat"])


def _build_vision(out: Path, recipe: VisionRecipe, built: Mapping[str, Path]) -> dict[str, Any]:
    from stoker.demo.vision import build_vision

    return build_vision(out, recipe)


def _build_smol(out: Path, recipe: SmolRecipe, built: Mapping[str, Path]) -> dict[str, Any]:
    from stoker.demo.smol import build_smol

    return build_smol(out, recipe)


def _build_smol_adapter(out: Path, recipe: SmolAdapterRecipe, built: Mapping[str, Path]) -> dict[str, Any]:
    from stoker.demo.smol_adapter import build_smol_adapter

    return build_smol_adapter(out, recipe, built["smol"])


_TRAINING = ("tasks", "corpus", "training", "evaluate")

DEMO_MODELS: dict[str, DemoModel] = {
    m.name: m
    for m in (
        DemoModel("chat", ChatRecipe(), _build_chat, (*_TRAINING, "tokenizer", "chat")),
        DemoModel("adapter", AdapterRecipe(), _build_adapter, (*_TRAINING, "adapter"), requires=("chat",)),
        DemoModel("vision", VisionRecipe(), _build_vision, ("training", "evaluate", "tokenizer", "vision_tasks", "vision")),
        # The real model a newcomer meets (SmolLM2-135M-Instruct, from its GGUF), and an adapter trained for it.
        DemoModel("smol", SmolRecipe(), _build_smol, ("smol", "evaluate")),
        DemoModel("smol-adapter", SmolAdapterRecipe(), _build_smol_adapter, ("smol_adapter", "training", "evaluate"),
                  requires=("smol",)),
    )
}
