"""The `stoker api` server as a subprocess on 127.0.0.1 for tests, and `openai` clients bound to it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import ROOT, free_port

STARTUP_TIMEOUT_S = 180
# Every request a test makes is bounded by this (seconds), and every load loop by its own count and deadline.
REQUEST_TIMEOUT_S = 60


@dataclass
class ApiServer:
    url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def metrics(self) -> dict[str, float]:
        """Unlabelled samples and labelled ones as 'name{labels}'."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(config: dict[str, Any], folder: Path, env: dict[str, str] | None = None) -> ApiServer:
    import yaml

    port = free_port()
    cfg = folder / "api.yaml"
    cfg.write_text(yaml.safe_dump({**config, "api_host": "127.0.0.1", "api_port": port}))
    log = folder / "server.log"
    environ = {k: v for k, v in os.environ.items() if k not in ("API_KEY", "API_MODEL_NAME", "API_HOST", "API_PORT")}
    # One torch thread: these models are tiny, and on a busy shared CPU two threads mostly wait for each other.
    environ.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", **(env or {})})
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stoker", "api", str(cfg)], stdout=out, stderr=subprocess.STDOUT, env=environ
        )
    server = ApiServer(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"stoker api exited with {proc.returncode}:\n{server.log_text()}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_server(server)
    pytest.fail(f"stoker api did not answer /health within {STARTUP_TIMEOUT_S} s:\n{server.log_text()}")


def stop_server(server: ApiServer) -> None:
    server.process.send_signal(signal.SIGINT)
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(timeout=10)


def client(srv: ApiServer, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.v1, api_key=kw.pop("api_key", "unused"), max_retries=0,
                         timeout=REQUEST_TIMEOUT_S, **kw)


def async_client(srv: ApiServer, **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=srv.v1, api_key=kw.pop("api_key", "unused"), max_retries=0,
                              timeout=REQUEST_TIMEOUT_S, **kw)
