"""Helpers the vision tests of both backends share: pictures as PNG bytes, and one web-chat turn with an upload."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from stoker.demo.vision_tasks import Picture


def png(picture: Picture) -> bytes:
    buf = io.BytesIO()
    picture.render().save(buf, format="PNG")
    return buf.getvalue()


def webchat_reply(service: Any, question: str, upload: Path) -> str:
    """The web chat's reply to ``question`` with the file ``upload`` attached, as its session code streams it."""
    import asyncio

    from stoker.webchat.session import ChatOptions, prepare, stream_reply

    async def run() -> str:
        prepared = prepare(service, [], question, [str(upload)], ChatOptions())
        turns = None
        async for turns in stream_reply(service, prepared):
            pass
        return turns[-1].reply

    return asyncio.run(run())
