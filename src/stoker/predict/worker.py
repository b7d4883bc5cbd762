"""One worker process of ``NPROC_PER_NODE=N stoker predict``: ``python -m stoker.predict.worker``.

The launcher (``ranks.launch_workers``) passes the settings as JSON in the environment, with the torchrun-style
RANK / WORLD_SIZE / MASTER_ADDR variables. Exit codes follow the CLI: 0 done, 2 a user error (its message printed
once, by the lowest failing rank), 130 interrupted.
"""

from __future__ import annotations

import logging
import os
import sys


def main() -> int:
    from stoker.logs import setup_logging
    from stoker.errors import StokerError
    from stoker.predict.ranks import DEBUG_ENV, SETTINGS_ENV, settings_from_json

    debug = os.environ.get(DEBUG_ENV) == "1"
    setup_logging(debug)
    try:
        settings = settings_from_json(os.environ[SETTINGS_ENV])
        from stoker.predict.runner import run_predict

        return run_predict(settings)
    except StokerError as exc:
        if debug:
            raise
        print(f"stoker: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    from stoker.predict.ranks import end_process

    logging.captureWarnings(True)
    raise SystemExit(end_process(main()))
