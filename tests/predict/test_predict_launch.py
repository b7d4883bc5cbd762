"""Which predict processes start on a machine, decided as LLaMA-Factory's launcher does (no GPU needed to test it)."""

from __future__ import annotations

import pytest

from stoker.errors import ConfigError
from stoker.predict.launch import LaunchPlan, plan_launch, tensor_parallel_for

GIB = 1 << 30


def plan(env: dict[str, str], devices: int, **kw) -> tuple[int, int]:
    result = plan_launch(env, devices, backend=kw.pop("backend", "huggingface"), **kw)
    return result.processes, result.gpus_per_process


def test_one_process_per_gpu_when_several_are_visible() -> None:
    assert plan({}, 0) == (1, 1)
    assert plan({}, 1) == (1, 1)
    assert plan({}, 8) == (8, 1)  # the guide's 8-GPU machine: every GPU used, no extra command
    assert plan({"WORLD_SIZE": "8", "RANK": "3"}, 8) == (1, 1)  # a worker does not launch workers


def test_llamafactory_launcher_variables_keep_their_meaning() -> None:
    assert plan({"NPROC_PER_NODE": "2"}, 8) == (2, 1)
    assert plan({"NPROC_PER_NODE": "4"}, 0) == (4, 1)  # CPU workers, sharing the cores
    assert plan({"NPROC_PER_NODE": "1"}, 8) == (1, 1)
    assert plan({"FORCE_TORCHRUN": "1"}, 1) == (1, 1)
    assert plan({"FORCE_TORCHRUN": "true", "NPROC_PER_NODE": "1"}, 1) == (1, 1)
    # CUDA_VISIBLE_DEVICES decides what is visible: the count handed in is torch's, after it.
    with pytest.raises(ConfigError, match="USE_RAY asks LLaMA-Factory's Ray launcher"):
        plan({"USE_RAY": "1"}, 8)
    with pytest.raises(ConfigError, match="NPROC_PER_NODE='0'; expected a number of processes >= 1"):
        plan({"NPROC_PER_NODE": "0"}, 8)


def test_vllm_replicates_a_model_that_fits_and_splits_one_that_does_not() -> None:
    small = {"backend": "vllm", "model_bytes": 16 * GIB, "device_bytes": 80 * GIB, "heads": 32}
    assert plan({}, 8, **small) == (8, 1)
    big = {**small, "model_bytes": 140 * GIB}  # a 70B in bf16 on 80 GiB GPUs at 0.7 utilisation
    assert plan({}, 8, **big) == (2, 4)
    huge = {**small, "model_bytes": 800 * GIB}
    assert plan({}, 8, **huge) == (1, 8)
    assert plan({"NPROC_PER_NODE": "2"}, 8, **small) == (2, 4)  # the count given, the GPUs shared out
    # The split divides the attention heads.
    assert tensor_parallel_for(8, model_bytes=100 * GIB, device_bytes=80 * GIB, gpu_util=0.7, heads=12) == 4
    assert tensor_parallel_for(8, model_bytes=100 * GIB, device_bytes=None, gpu_util=0.7, heads=12) == 1


def test_the_plan_says_what_it_chose() -> None:
    assert plan_launch({}, 8, backend="vllm", model_bytes=140 * GIB, device_bytes=80 * GIB, heads=64) == LaunchPlan(
        2, 4, "8 GPUs visible and the model needs 4: tensor parallel 4, 2 replica(s)")
    assert plan_launch({}, 4, backend="huggingface").reason == "4 GPUs visible: one replica per GPU"
