"""One worker process of ``NPROC_PER_NODE=N stoker predict``: ``python -m stoker.predict.worker``.

The launcher (``ranks.launch_workers``) passes the settings as JSON in the environment, with the torchrun-style
RANK / WORLD_SIZE / MASTER_ADDR variables. Exit codes follow the CLI: 0 done, 2 a user error (its message printed
once, by the lowest failing rank), 3 stopped because another worker vanished, 130 interrupted.

A worker must not outlive its launcher: one left running would go on writing into ``output_dir`` beside the next
run. On Linux the kernel sends it SIGTERM when the launcher dies (``PR_SET_PDEATHSIG``, which holds even for a
``kill -9``); elsewhere a thread watches the parent process id.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1


def die_with_launcher(launcher_pid: int) -> None:
    """End this process when the launcher ``launcher_pid`` is gone."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0:
            if os.getppid() != launcher_pid:  # it died before the request was made: the signal will never come
                os._exit(1)
            return

    def watch() -> None:
        while os.getppid() == launcher_pid:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def main() -> int:
    from stoker.logs import setup_logging
    from stoker.errors import StokerError
    from stoker.predict.ranks import DEBUG_ENV, LAUNCHER_ENV, SETTINGS_ENV, settings_from_json

    if os.environ.get(LAUNCHER_ENV):
        die_with_launcher(int(os.environ[LAUNCHER_ENV]))
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
