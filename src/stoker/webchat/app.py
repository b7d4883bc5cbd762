"""``stoker webchat``: load the model, then serve the chat page until Ctrl-C."""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import time

from stoker.config import Settings
from stoker.errors import ConfigError

logger = logging.getLogger("stoker")


def check_port(host: str, port: int) -> None:
    """Fail before the (slow) model load when the page could not be served at host:port."""
    if not 0 < port < 65536:
        raise ConfigError(
            f"invalid value for gradio_server_port: {port!r}; expected a port number from 1 to 65535 "
            "(set GRADIO_SERVER_PORT or gradio_server_port)."
        )
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(
            f"invalid value for gradio_server_name: {host!r} ({exc.strerror}); use an address of this machine such "
            "as 127.0.0.1, or 0.0.0.0 for every interface (GRADIO_SERVER_NAME or gradio_server_name)."
        ) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # As the server will: a port left in TIME_WAIT by a previous run is free to use.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                fix = "Pick a free port with GRADIO_SERVER_PORT (or gradio_server_port), or stop what is using it."
            else:
                fix = ("Use an address of this machine with GRADIO_SERVER_NAME (or gradio_server_name), e.g. "
                       "127.0.0.1, or 0.0.0.0 for every interface.")
            raise ConfigError(f"cannot serve the web chat on {host}:{port}: {exc.strerror}. {fix}") from None


def run_webchat(settings: Settings) -> int:
    # Before Gradio is imported: it reads this at import and launch time.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    check_port(settings.gradio_server_name, settings.gradio_server_port)

    from stoker.chat import open_chat_service

    start = time.perf_counter()
    # With adapters, each stays selectable per request, so Compare can answer with the base and each adapter in one
    # batch; the chat itself still answers as the configured model (the adapters applied in order).
    service = open_chat_service(settings, per_request_adapters=bool(settings.adapter_name_or_path))
    logger.info("model ready in %.1f s", time.perf_counter() - start)
    try:
        from stoker.webchat.ui import build_ui, launch_options

        blocks = build_ui(service)
        _, local_url, share_url = blocks.launch(**launch_options(settings), prevent_thread_lock=True, quiet=True)
        logger.info("web chat on %s%s (Ctrl-C stops)", local_url, f" and {share_url}" if share_url else "")
        _serve_until_interrupted(blocks)
        return 0
    finally:
        service.close()


def _serve_until_interrupted(blocks: object) -> None:
    # SIGTERM (docker stop, kill) ends the server as cleanly as Ctrl-C does.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        while blocks.is_running:  # type: ignore[attr-defined]
            time.sleep(0.2)
    except KeyboardInterrupt:
        logger.info("stopping the web chat")
    finally:
        signal.signal(signal.SIGTERM, previous)
        blocks.close(verbose=False)  # type: ignore[attr-defined]


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
