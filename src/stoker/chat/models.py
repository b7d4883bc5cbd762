"""The models a chat service answers as, by id: the configured model, each adapter alone, and the base weights.

The configured model is what the config describes: the base with its adapters applied in order, exactly what
``stoker chat`` on the same YAML runs. It is the default everywhere, and its id is ``API_MODEL_NAME`` when set, else
``model_name_or_path`` as written (a hub id stays ``org/name``). Where adapters are selectable per request (the API),
each is also served alone under its id (``name=path``, or the last component of the path as written), and the base
weights under ``<configured id>:base``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from stoker.engines.base import BASE_WEIGHTS

BASE_SUFFIX = ":base"


@dataclass(frozen=True)
class ServedModel:
    id: str
    adapter: str | None  # GenerationRequest.adapter: None for the engine's default (the configured model)
    parent: str | None = None  # the configured model's id, for the adapters and the base weights
    description: str = ""  # what answers: "base + adapter + ..."


def short_name(written: str) -> str:
    """A model path as people say it: a hub id or alias as written, a folder by its last component."""
    parts = [p for p in written.replace("\\", "/").split("/") if p]
    if len(parts) == 2 and not written.startswith((".", "/", "~")):
        return written  # org/name
    return parts[-1] if parts else written


@dataclass(frozen=True)
class ServedModels:
    configured: ServedModel
    others: tuple[ServedModel, ...] = ()
    aliases: tuple[str, ...] = ()  # other names of the configured model: the path as written, its last component

    @classmethod
    def build(cls, *, model: str, name: str | None, adapters: Sequence[str], selectable: bool) -> ServedModels:
        """``model``: model_name_or_path as written; ``name``: API_MODEL_NAME; ``adapters``: the config's adapter
        ids in order; ``selectable``: each can be picked per request."""
        configured_id = name or model
        description = " + ".join([short_name(model), *adapters])
        configured = ServedModel(configured_id, None, description=description)
        others: list[ServedModel] = []
        if adapters and selectable:
            others = [ServedModel(a, a, parent=configured_id, description=f"{short_name(model)} + {a}")
                      for a in adapters]
            others.append(ServedModel(configured_id + BASE_SUFFIX, BASE_WEIGHTS, parent=configured_id,
                                      description=f"{short_name(model)} (no adapter)"))
        aliases = tuple(a for a in dict.fromkeys([model, short_name(model), model.rstrip("/")]) if a != configured_id)
        return cls(configured, tuple(others), aliases)

    @property
    def all(self) -> list[ServedModel]:
        return [self.configured, *self.others]

    def resolve(self, model_id: str) -> ServedModel | None:
        """The model an id names (the configured model's aliases included), or None for an unknown id."""
        found = next((m for m in self.all if m.id == model_id), None)
        if found is None and model_id in self.aliases:
            return self.configured
        return found
