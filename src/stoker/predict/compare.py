"""``compare: base,ADAPTER,...``: one predict run answered by several models side by side.

The config's adapters stay selectable per request on one engine, and each compared model's predictions run as a
predict of their own (its sub-folder of ``output_dir``: predictions, metrics, resume and lock as usual) in a thread
of this process, so the engine decodes the rows of every model in the same continuous batch. At the end the
metrics are written side by side to ``compare_results.json`` and shown as a table.
"""

from __future__ import annotations

import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from stoker.config import Settings
from stoker.errors import ConfigError

logger = logging.getLogger("stoker")

BASE = "base"
COMPARE_FILE = "compare_results.json"


@dataclass(frozen=True)
class Target:
    label: str  # as written in ``compare``: "base" or an adapter id
    adapter: str | None  # GenerationRequest.adapter

    @property
    def folder(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.label).strip("._") or "model"


def compare_targets(settings: Settings, adapter_ids: list[str]) -> list[Target]:
    """The models ``compare`` names, checked against the config's adapters; a ``ConfigError`` names a wrong one."""
    from stoker.engines.base import BASE_WEIGHTS

    if not adapter_ids:
        raise ConfigError("compare needs adapters to compare: set adapter_name_or_path (comma list, or name=path "
                          "entries), then compare: base,NAME,...", param="compare")
    targets: list[Target] = []
    for label in dict.fromkeys(settings.compare):
        if label == BASE:
            targets.append(Target(label, BASE_WEIGHTS))
        elif label in adapter_ids:
            targets.append(Target(label, label))
        else:
            raise ConfigError(f"compare: {label!r} is neither base nor one of the adapters ({', '.join(adapter_ids)}).",
                              param="compare")
    folders = [t.folder for t in targets]
    if len(set(folders)) != len(folders):
        raise ConfigError(f"compare: the models' folder names collide ({', '.join(folders)}); name the adapters "
                          "apart with name=path entries.", param="compare")
    return targets


def run_compare(settings: Settings) -> int:
    from stoker.chat import open_chat_service
    from stoker.models.loader import adapter_paths
    from stoker.predict.ranks import world_from_env
    from stoker.predict.runner import engine_settings, predict

    world = world_from_env()
    if world.size > 1:
        raise ConfigError("compare runs in one process (its models share one engine): start it without torchrun, "
                          "or with NPROC_PER_NODE=1.", param="compare")
    targets = compare_targets(settings, list(adapter_paths(settings)))
    root = Path(settings.output_dir or "")
    service = open_chat_service(engine_settings(settings), per_request_adapters=True)
    try:
        def one(target: Target) -> int:
            sub = replace(settings, output_dir=str(root / target.folder), compare=[target.label])
            return predict(sub, world, shared=service, adapter=target.adapter)

        with ThreadPoolExecutor(max_workers=len(targets), thread_name_prefix="stoker-compare") as pool:
            codes = list(pool.map(one, targets))
    finally:
        service.close()
    if any(codes):
        return max(codes)
    table = {t.label: _metrics(root / t.folder) for t in targets}
    (root / COMPARE_FILE).write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    for line in metrics_table(table).splitlines():
        logger.info("compare: %s", line)
    logger.info("compare: wrote %s", root / COMPARE_FILE)
    return 0


def _metrics(folder: Path) -> dict[str, Any]:
    from stoker.predict.writer import RESULTS_FILE

    return json.loads((folder / RESULTS_FILE).read_text(encoding="utf-8"))


def metrics_table(table: dict[str, dict[str, Any]]) -> str:
    """The models' scores side by side: one row per metric, one column per model."""
    keys = [k for k in dict.fromkeys(k for m in table.values() for k in m)
            if not k.endswith(("_runtime", "_per_second"))]
    header = ["metric", *table]
    rows = [[k, *(f"{m[k]:.4f}" if isinstance(m.get(k), (int, float)) else "-" for m in table.values())]
            for k in keys]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])
