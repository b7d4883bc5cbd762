"""Data-parallel predict: which process this is, how processes agree, and the launcher behind ``NPROC_PER_NODE``.

Every process holds its own model replica and predicts the rows whose position ``p`` in the run satisfies
``p % world_size == rank``. Processes talk only at a few points (after setup, after model loading, at the end), over
``torch.distributed`` with the gloo backend, which needs no GPU. Two ways to start them, with one env contract
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``):

- ``torchrun --nproc_per_node N -m stoker predict cfg.yaml`` sets it;
- ``stoker predict cfg.yaml`` with several GPUs visible (or ``NPROC_PER_NODE=N`` / ``FORCE_TORCHRUN``; see
  ``predict.launch``): ``launch_workers`` starts the copies of ``stoker.predict.worker`` on 127.0.0.1 and waits
  for them.

When a step fails on some process, all of them learn it at the next agreement point (``Group.agree``): the lowest
failing rank raises its error (the one message the user sees) and the others stop quietly with ``PeerFailed``.
A process that dies outright (killed, out of memory) cannot report anything: the launcher sees it exit, stops the
others at once and says in one line which rank died; a survivor caught in a collective with it stops with
``PeerLost`` (quietly under our launcher, which speaks for the run). Workers end with their launcher, even a
``kill -9``-ed one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from stoker.config import Settings
from stoker.errors import ConfigError
from stoker.predict.launch import NPROC_ENV, LaunchPlan

logger = logging.getLogger("stoker")

T = TypeVar("T")

SETTINGS_ENV = "STOKER_PREDICT_SETTINGS"  # the launcher hands the validated settings to its workers as JSON
DEBUG_ENV = "STOKER_PREDICT_DEBUG"
LAUNCHER_ENV = "STOKER_PREDICT_LAUNCHER_PID"  # set for our workers: whom to die with, and that the launcher speaks
EXIT_PEER_LOST = 3  # a worker stopped because another one vanished; never the cause the launcher reports
# Processes wait for the slowest one at the end of generation, which can take hours; a crashed process is noticed
# by the launcher (torchrun or ours), which stops the rest, so this only bounds a hang nobody else would notice.
COLLECTIVE_TIMEOUT = timedelta(days=2)
FAILURE_GRACE_S = 30.0


class PeerFailed(Exception):
    """Another process failed and reported it; this one stops without repeating the message."""


class PeerLost(Exception):
    """A collective failed: another process vanished without reporting anything."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, position: int) -> bool:
        return position % self.size == self.rank


def world_from_env(env: dict[str, str] | None = None) -> World:
    """The process's place in a torchrun-style group; a single process when ``WORLD_SIZE`` is unset."""
    env = dict(os.environ) if env is None else env
    if "WORLD_SIZE" not in env:
        return World()
    try:
        size = int(env["WORLD_SIZE"])
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", str(rank)))
        local_size = int(env.get("LOCAL_WORLD_SIZE", str(size)))
    except ValueError:
        raise ConfigError(
            "RANK / WORLD_SIZE / LOCAL_RANK are set but not integers; start several processes with torchrun "
            f"or {NPROC_ENV}=N, or unset them."
        ) from None
    if not 0 <= rank < size:
        raise ConfigError(f"RANK={rank} is outside WORLD_SIZE={size}; start the processes with torchrun.")
    return World(rank, size, local_rank, local_size)


# --- agreement between processes -----------------------------------------------------------------------------------


class Group:
    """The few collective operations predict needs; with one process every call is local."""

    def __init__(self, world: World):
        self.world = world
        self._dist: Any = None
        if world.size > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo", rank=world.rank, world_size=world.size, timeout=COLLECTIVE_TIMEOUT)
            self._dist = dist
            global _joined_a_group
            _joined_a_group = True

    def gather(self, value: Any) -> list[Any]:
        """Every process's ``value``, in rank order, on every process (also a barrier)."""
        if self._dist is None:
            return [value]
        out: list[Any] = [None] * self.world.size
        try:
            self._dist.all_gather_object(out, value)
        except Exception as exc:  # gloo raises plain RuntimeErrors ("Connection closed by peer") when one died
            raise PeerLost(str(exc)) from exc
        return out

    def agree(self, step: Callable[[], T]) -> T:
        """Run ``step`` here, then learn whether it worked everywhere; see the module docstring for failures."""
        try:
            result = step()
            failure = None
        except Exception as exc:  # a Ctrl-C is not reported: every process got it and stops on its own
            if self._dist is None:
                raise
            error: Exception | None = exc
            failure = str(exc) or type(exc).__name__
        else:
            error = None
        failures = [(rank, f) for rank, f in enumerate(self.gather(failure)) if f is not None]
        if not failures:
            return result
        first_rank, message = failures[0]
        if first_rank == self.world.rank and error is not None:
            raise error
        raise PeerFailed(f"process {first_rank} failed: {message}")

    def close(self) -> None:
        if self._dist is not None and self._dist.is_initialized():
            self._dist.destroy_process_group()
        self._dist = None


_joined_a_group = False


def end_process(code: int) -> int:
    """Exit a process that took part in a process group right away, with ``code``; any other process gets ``code``
    back to exit normally.

    Everything is saved and reported by the time this runs. What remains is the interpreter's teardown, and there
    the native threads of the collective library (gloo, the TCP store) can now and then abort the process
    ("terminate called without an active exception", SIGABRT), which would turn a finished run into a failed one.
    Skipping that teardown is safe because the files were written and closed before this point.
    """
    if not _joined_a_group:
        return code
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or gone: nothing left to lose
            pass
    os._exit(code)


# --- the NPROC_PER_NODE launcher -----------------------------------------------------------------------------------


def launch_workers(settings: Settings, plan: LaunchPlan, *, lock_fd: int | None = None) -> int:
    """Run predict in ``plan.processes`` worker processes on this machine; returns the exit code for the CLI.

    Workers share the CPU cores between them (``OMP_NUM_THREADS``, unless set already) and, with enough GPUs
    visible, get ``plan.gpus_per_process`` each (``CUDA_VISIBLE_DEVICES``; more than one is vLLM tensor
    parallelism). The first worker that fails stops the others. ``lock_fd`` (the ``output_dir`` lock) is inherited
    by every worker, so the folder stays locked until the last of them is gone.
    """
    count, per = plan.processes, plan.gpus_per_process
    if per > 1:
        settings = dataclasses.replace(settings, vllm_tensor_parallel_size=per)
    base = dict(os.environ)
    base.pop(NPROC_ENV, None)
    base.pop("FORCE_TORCHRUN", None)
    base[SETTINGS_ENV] = settings_to_json(settings)
    base[LAUNCHER_ENV] = str(os.getpid())
    if logger.isEnabledFor(logging.DEBUG):
        base[DEBUG_ENV] = "1"
    src = str(Path(__file__).resolve().parents[2])  # so that `-m stoker.predict.worker` imports this very package
    base["PYTHONPATH"] = os.pathsep.join(p for p in (src, base.get("PYTHONPATH")) if p)
    base.update({"WORLD_SIZE": str(count), "LOCAL_WORLD_SIZE": str(count), "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(_free_port())})  # fmt: skip
    if "OMP_NUM_THREADS" not in base:
        base["OMP_NUM_THREADS"] = str(max(1, _cpu_count() // count))
    gpus = _gpu_ids(base)
    pinned = len(gpus) >= count * per
    logger.info("predict: %s; starting %d worker processes (%s)", plan.reason, count,
                (f"{per} GPUs each" if per > 1 else "one GPU each") if pinned
                else f"{base['OMP_NUM_THREADS']} CPU threads each")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for rank in range(count):
            env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            if pinned:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[rank * per : (rank + 1) * per])
            procs.append(subprocess.Popen([sys.executable, "-m", "stoker.predict.worker"], env=env,
                                          pass_fds=() if lock_fd is None else (lock_fd,)))
        return _wait_all(procs)
    except KeyboardInterrupt:
        # The terminal's Ctrl-C reached the workers too (same process group); give them time to save and stop.
        _stop(procs, signal.SIGINT, grace=10.0)
        return 130
    finally:
        _stop(procs, signal.SIGTERM, grace=5.0)


def _wait_all(procs: list[subprocess.Popen[bytes]]) -> int:
    """Wait for every worker. A worker that reported an error (exit code 2) lets the others stop on their own: they
    learn it at the next agreement point, within moments, and get ``FAILURE_GRACE_S`` before they are stopped. One
    that died any other way said nothing and never will, so the others are stopped at once and the launcher says
    which rank died; the rows finished so far are saved and the next run resumes from them."""
    deadline = None
    while True:
        running = [p for p in procs if p.poll() is None]
        died = _died(procs)
        if died is not None:
            _stop(procs, signal.SIGTERM, grace=5.0)
            rank, code = died
            print(f"stoker: error: predict worker {rank} (of {len(procs)}) {_how(code)}; the other workers were "
                  "stopped. The rows finished so far are saved: run the same command again to resume.",
                  file=sys.stderr)  # fmt: skip
            return 1
        if not running:
            break
        if deadline is None and any(p.returncode not in (None, 0) for p in procs):
            deadline = time.monotonic() + FAILURE_GRACE_S
        if deadline is not None and time.monotonic() > deadline:
            _stop(procs, signal.SIGTERM, grace=5.0)
            break
        time.sleep(0.1)
    codes = [p.wait() for p in procs]
    if not any(codes):
        return 0
    chosen = [c for c in codes if c > 0 and c != EXIT_PEER_LOST]  # codes the workers exited with, not signals
    # Rank 0 speaks for the run (its error is the one printed); else the first failure's code.
    return codes[0] if codes[0] in chosen else (chosen[0] if chosen else 1)


def _died(procs: list[subprocess.Popen[bytes]]) -> tuple[int, int] | None:
    """The first worker that ended in a way it did not report (a signal, a crash), as (rank, exit code)."""
    for rank, proc in enumerate(procs):
        if proc.returncode is not None and proc.returncode not in (0, 2, 130, EXIT_PEER_LOST):
            return rank, proc.returncode
    return None


def _how(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (often the out-of-memory killer)" if -code == signal.SIGKILL else ""
        return f"died: killed by {name}{hint}"
    return f"died with exit code {code}"


def _stop(procs: list[subprocess.Popen[bytes]], sig: int, *, grace: float) -> None:
    alive = [p for p in procs if p.poll() is None]
    for proc in alive:
        proc.send_signal(sig)
    deadline = time.monotonic() + grace
    for proc in alive:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def settings_to_json(settings: Settings) -> str:
    values = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings) if f.name != "origins"}
    return json.dumps(values, default=str)


def settings_from_json(text: str) -> Settings:
    from stoker.config import settings_from_dict

    values = json.loads(text)
    source = values.pop("source", None)
    return settings_from_dict(values, source=source)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def _gpu_ids(env: dict[str, str]) -> list[str]:
    """GPU ids the workers may be pinned to: CUDA_VISIBLE_DEVICES as given, else every GPU torch sees."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no usable CUDA: CPU workers
        return []


def pin_gpu(world: World) -> None:
    """Under torchrun, each local process takes its own GPU (the NPROC_PER_NODE launcher pins them already)."""
    if world.size == 1:
        return
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 1:
        torch.cuda.set_device(world.local_rank % torch.cuda.device_count())
