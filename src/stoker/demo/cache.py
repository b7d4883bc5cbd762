"""Build each demo model once per recipe, share it between processes, and never expose a half-written folder.

Layout under the cache root (``$STOKER_DEMO_DIR``, else ``$XDG_CACHE_HOME/stoker/demo``, else
``~/.cache/stoker/demo``)::

    chat-<fingerprint>/          a finished model; its build record is BUILD_RECORD inside
    adapter-<fingerprint>/
    .chat-<fingerprint>.lock     held while one process builds that folder
    .tmp-chat-<fingerprint>-<pid>/   a build in progress, renamed into place when complete

The fingerprint hashes the recipe, the source of the modules that shape the model, the fingerprints of the models
it builds on and the versions of the libraries that write it, so a change to any of them builds a new folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path

from stoker.demo.registry import DEMO_MODELS, DemoModel
from stoker.errors import ConfigError

log = logging.getLogger(__name__)

ENV_DIR = "STOKER_DEMO_DIR"
BUILD_RECORD = "stoker-demo.json"
LIBRARIES = ("torch", "transformers", "tokenizers", "peft", "gguf")
LOCK_TIMEOUT_S = 1800.0  # a build takes minutes; waiting longer than this means something is stuck


def cache_root(root: Path | None = None) -> Path:
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    from stoker.paths import cache_home

    return cache_home() / "demo"


def fingerprint(model: DemoModel, models: Mapping[str, DemoModel] = DEMO_MODELS) -> str:
    digest = hashlib.sha256()
    digest.update(f"{model.name}\n{model.recipe!r}\n".encode())
    for module in model.modules:
        spec = importlib.util.find_spec(f"stoker.demo.{module}")
        assert spec is not None and spec.origin is not None, module
        digest.update(Path(spec.origin).read_bytes())
    for name in model.requires:
        digest.update(fingerprint(models[name], models).encode())
    for library in LIBRARIES:
        digest.update(f"{library}=={_version(library)}\n".encode())
    return digest.hexdigest()[:16]


def ensure(
    names: Iterable[str] | None = None, root: Path | None = None, models: Mapping[str, DemoModel] = DEMO_MODELS
) -> dict[str, Path]:
    """The folder of each named model (all by default) and of what it requires, building what is missing."""
    root = cache_root(root)
    built: dict[str, Path] = {}

    def visit(name: str) -> None:
        if name in built:
            return
        model = models[name]
        for required in model.requires:
            visit(required)
        built[name] = _ensure_one(model, root, {r: built[r] for r in model.requires}, models)

    for name in list(models) if names is None else names:
        if name not in models:
            raise ConfigError(f"unknown demo model {name!r}; choose from: {', '.join(models)}")
        visit(name)
    return built


def _ensure_one(model: DemoModel, root: Path, required: dict[str, Path], models: Mapping[str, DemoModel]) -> Path:
    from filelock import FileLock, Timeout

    final = root / f"{model.name}-{fingerprint(model, models)}"
    if (final / BUILD_RECORD).is_file():
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(root / f".{final.name}.lock")
        try:
            lock.acquire(timeout=1)
        except Timeout:
            log.info("waiting for another process to finish building %s", final)
            lock.acquire(timeout=LOCK_TIMEOUT_S)
    except (OSError, Timeout) as exc:
        raise ConfigError(
            f"cannot use the demo model cache {root}: {exc}. "
            f"Set {ENV_DIR} to a writable folder, or remove a stale lock file there."
        ) from exc
    try:
        if (final / BUILD_RECORD).is_file():  # another process finished it while we waited
            return final
        # Holding the lock, any leftover of this folder is from a crashed build.
        for stale in [final, *root.glob(f".tmp-{final.name}-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".tmp-{final.name}-{os.getpid()}"
        tmp.mkdir()
        log.info("building demo model %r in %s (once per recipe; a few minutes on CPU)", model.name, final)
        started, cpu_started = time.monotonic(), time.process_time()
        try:
            metrics = model.build(tmp, model.recipe, required)
            record = {
                "name": model.name,
                "seconds": round(time.monotonic() - started, 1),
                # On a shared machine wall time says more about the neighbours than about the build.
                "cpu_seconds": round(time.process_time() - cpu_started, 1),
                "metrics": metrics,
                "recipe": asdict(model.recipe),
                "libraries": {library: _version(library) for library in LIBRARIES},
            }
            (tmp / BUILD_RECORD).write_text(json.dumps(record, indent=2) + "\n")
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("built demo model %r in %.0f s (%.0f s of CPU)", model.name, record["seconds"], record["cpu_seconds"])
        return final
    finally:
        lock.release()


def build_record(folder: Path) -> dict:
    """What the build of a demo model folder recorded: seconds, metrics (accuracy, parameters), recipe, libraries."""
    return json.loads((Path(folder) / BUILD_RECORD).read_text())


def _version(library: str) -> str:
    import importlib.metadata  # not at the top: it costs a third of this package's import time

    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return "absent"
