"""The OpenAI-compatible API server (``stoker api``); see docs/api.md.

- ``app``: the FastAPI app (``create_app``) and ``run_api(settings)``.
- ``protocol``: the wire format (pydantic request/response models, stream chunk builders).
- ``serving_chat`` / ``serving_completions``: the two generation routes.
- ``replies``: generated text to content, reasoning and tool calls, whole or streamed; JSON mode.
- ``state``: served model ids, request-to-sampling mapping, token budget.
- ``streams``: admission before headers, merging, client disconnects.
- ``errors``, ``auth``, ``metrics``, ``middleware``: OpenAI error shapes, bearer key, Prometheus text, request ids.

Importing this package imports nothing heavy; ``app`` imports FastAPI.
"""
