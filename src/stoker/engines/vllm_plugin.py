"""A vLLM general plugin (entry point ``vllm.general_plugins``): vLLM loads it in each of its processes.

It lets vLLM's LLaVA code import without torchvision. vLLM 0.32's ``models/llava.py`` imports ``models/pixtral.py``,
which takes one pure function, ``_num_image_tokens``, from transformers' torchvision-backed Pixtral image processor
module; importing that module needs torchvision, which has no build for torch 2.13.0+cpu on this project's
registries. transformers 5 ships the same function in its PIL-backed sibling module. When torchvision is missing,
the plugin registers that module name with the one function taken from the PIL module, so nothing that needs
torchvision is ever imported through it; with torchvision installed it does nothing. A plugin rather than a patch
in Stoker's process because vLLM inspects model classes in a subprocess, and plugins run there too.
"""

from __future__ import annotations

import importlib.util
import sys
import types

TORCHVISION_MODULE = "transformers.models.pixtral.image_processing_pixtral"
PIL_MODULE = "transformers.models.pixtral.image_processing_pil_pixtral"


def register() -> None:
    """Alias the one helper vLLM needs when torchvision is absent (idempotent)."""
    if TORCHVISION_MODULE in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return
    try:
        pil = importlib.import_module(PIL_MODULE)
    except ImportError:  # another transformers layout: leave vLLM's own error in place
        return
    module = types.ModuleType(TORCHVISION_MODULE, "Pixtral's image-token count, from the PIL module (see stoker).")
    module._num_image_tokens = pil._num_image_tokens  # type: ignore[attr-defined]
    sys.modules[TORCHVISION_MODULE] = module
