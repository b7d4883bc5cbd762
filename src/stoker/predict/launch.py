"""How many predict processes to start, and how many GPUs each takes: LLaMA-Factory's launch rule, made explicit.

``llamafactory-cli train`` starts one process per visible accelerator under torchrun, with no extra command, when
more than one is visible (``FORCE_TORCHRUN`` forces it, ``NPROC_PER_NODE`` sets the count, ``CUDA_VISIBLE_DEVICES``
decides what is visible). Stoker follows the same rule, and on the vllm backend also decides how the GPUs are used:
a model that fits one GPU runs as one replica per GPU (data parallel: fastest for batch predict); a bigger one is
split by tensor parallelism over the fewest GPUs that hold it, with one replica per such group.

``plan_launch`` is pure: it takes the environment and the machine's facts, so the decision is tested without GPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from stoker.errors import ConfigError

NPROC_ENV = "NPROC_PER_NODE"
# Headroom over the weights for the KV cache, activations and the CUDA context, per GPU, when deciding fit.
WEIGHT_HEADROOM = 1.3


@dataclass(frozen=True)
class LaunchPlan:
    processes: int  # worker processes (1: run here, in this process)
    gpus_per_process: int  # GPUs each worker gets; >1 is vLLM tensor parallelism
    reason: str  # what was chosen and why, for the log

    @property
    def launches(self) -> bool:
        return self.processes > 1


def truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "y", "yes")


def plan_launch(
    env: dict[str, str],
    devices: int,
    *,
    backend: str,
    model_bytes: int | None = None,
    device_bytes: int | None = None,
    gpu_util: float = 0.7,
    heads: int | None = None,
) -> LaunchPlan:
    """The launch for ``stoker predict`` / ``stoker train`` given the environment and ``devices`` visible GPUs."""
    if "WORLD_SIZE" in env:
        return LaunchPlan(1, 1, "this is already one process of a group (torchrun or Stoker's launcher)")
    if truthy(env.get("USE_RAY")):
        raise ConfigError("USE_RAY asks LLaMA-Factory's Ray launcher, which Stoker does not have; unset USE_RAY "
                          "(Stoker starts one process per GPU itself) or set NPROC_PER_NODE.")
    raw = env.get(NPROC_ENV, "").strip()
    forced = truthy(env.get("FORCE_TORCHRUN"))
    if raw:
        try:
            count = int(raw)
        except ValueError:
            count = 0
        if count < 1:
            raise ConfigError(f"{NPROC_ENV}={raw!r}; expected a number of processes >= 1 (e.g. {NPROC_ENV}=2).")
        if count == 1 and not forced:
            return LaunchPlan(1, 1, f"{NPROC_ENV}=1")
        per = max(1, devices // count) if backend == "vllm" and devices >= count else 1
        return LaunchPlan(count, per, f"{NPROC_ENV}={count}")
    if devices <= 1:
        if forced:
            return LaunchPlan(1, 1, "FORCE_TORCHRUN with one device: one worker process")
        return LaunchPlan(1, 1, f"{devices} GPU visible: one process" if devices else "no GPU: one process")
    if backend != "vllm":
        return LaunchPlan(devices, 1, f"{devices} GPUs visible: one replica per GPU")
    tp = tensor_parallel_for(devices, model_bytes=model_bytes, device_bytes=device_bytes, gpu_util=gpu_util,
                             heads=heads)
    if tp == 1:
        return LaunchPlan(devices, 1, f"{devices} GPUs visible and the model fits one: one vLLM replica per GPU")
    return LaunchPlan(devices // tp, tp, f"{devices} GPUs visible and the model needs {tp}: tensor parallel {tp}, "
                                         f"{devices // tp} replica(s)")


def tensor_parallel_for(devices: int, *, model_bytes: int | None, device_bytes: int | None, gpu_util: float,
                        heads: int | None) -> int:
    """The smallest power of two of GPUs that holds the weights (with headroom) and divides the attention heads."""
    if not model_bytes or not device_bytes:
        return 1  # nothing known: replicas, as LLaMA-Factory's data-parallel predict does
    tp = 1
    while tp < devices:
        if model_bytes * WEIGHT_HEADROOM <= tp * device_bytes * gpu_util and (not heads or heads % tp == 0):
            return tp
        tp *= 2
    if heads and heads % tp:
        tp //= 2
    return max(1, min(tp, devices))


def weights_bytes(folder: Path) -> int:
    """The size of a model folder's weight files."""
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin", "*.pt", "*.gguf") for f in folder.glob(pattern))


def visible_devices() -> tuple[int, int | None]:
    """(visible CUDA GPUs, memory of the first in bytes); (0, None) where torch sees none."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return 0, None
    try:
        import torch

        if not torch.cuda.is_available():
            return 0, None
        return torch.cuda.device_count(), int(torch.cuda.get_device_properties(0).total_memory)
    except Exception:  # noqa: BLE001 - a broken CUDA setup is no GPU for this decision
        return 0, None
