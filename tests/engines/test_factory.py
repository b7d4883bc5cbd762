"""``engines.factory``: one rule, both backends, for what becomes of the config's LoRA adapters; torch's threads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, STORIES

from stoker.config import settings_from_dict
from stoker.engines.factory import AdapterPlan, plan_adapters
from stoker.errors import ConfigError
from stoker.models.loader import STACKED_ADAPTER

ONE = {"a": Path("/x/a")}
TWO = {"a": Path("/x/a"), "b": Path("/x/b")}


def plan(adapters: dict, *, per_request: bool = False, **raw) -> AdapterPlan:
    return plan_adapters(settings_from_dict({"model_name_or_path": "/x/m", **raw}), adapters, per_request=per_request)


def test_huggingface_merges_in_order_unless_told_not_to() -> None:
    assert plan(TWO) == AdapterPlan(merge=True, default=None, per_request=False)
    assert plan(ONE, merge_adapters=False) == AdapterPlan(merge=False, default="a", per_request=False)
    assert plan({}) == AdapterPlan(merge=False, default=None, per_request=False)
    with pytest.raises(ConfigError, match="stacking several in order needs merging"):
        plan(TWO, merge_adapters=False)


def test_vllm_never_merges_and_takes_one_adapter_for_fixed_weights() -> None:
    assert plan(ONE, infer_backend="vllm") == AdapterPlan(merge=False, default="a", per_request=False)
    with pytest.raises(ConfigError, match=r"vllm applies one LoRA adapter per request, but adapter_name_or_path lists "
                                          r"2 \(a, b\)"):
        plan(TWO, infer_backend="vllm")


@pytest.mark.parametrize("backend", ["huggingface", "vllm"])
def test_per_request_adapters_default_to_the_configured_model(backend: str) -> None:
    assert plan({}, per_request=True, infer_backend=backend) == AdapterPlan(merge=False, default=None,
                                                                               per_request=True)
    assert plan(ONE, per_request=True, infer_backend=backend) == AdapterPlan(merge=False, default="a",
                                                                                per_request=True)


def test_several_per_request_adapters_stack_on_huggingface_only() -> None:
    assert plan(TWO, per_request=True) == AdapterPlan(merge=False, default=STACKED_ADAPTER, per_request=True,
                                                      stack=True)
    with pytest.raises(ConfigError, match=r"so it cannot serve the configured model, which applies 2 adapters in "
                                          r"order \(a, b\)"):
        plan(TWO, per_request=True, infer_backend="vllm")


def test_torch_threads_is_set_before_the_model_loads(tmp_path: Path) -> None:
    """In a fresh process (the setting is process-wide): torch's thread count is the key's, and 0 leaves torch's own."""
    script = ("import sys, torch\n"
              "from stoker.config import settings_from_dict\n"
              "from stoker.engines.factory import open_engine\n"
              "default = torch.get_num_threads()\n"
              "opened = open_engine(settings_from_dict({'model_name_or_path': sys.argv[1], 'torch_threads': int(sys.argv[2])}))\n"
              "print(default, torch.get_num_threads())\n"
              "opened.engine.close()\n")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("OMP_NUM_THREADS", None)
    for threads in ("1", "0"):
        proc = subprocess.run([sys.executable, "-c", script, str(STORIES), threads], env=env, capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        default, now = map(int, proc.stdout.split())
        assert now == (1 if threads == "1" else default)
