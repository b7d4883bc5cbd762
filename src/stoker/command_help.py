"""``stoker COMMAND --help``: what each command does, its arguments, the config keys that matter to it, its
environment variables and an example. Plain text, no imports: help must answer at once."""

from __future__ import annotations

CONFIG_ARGS = """\
arguments:
  CONFIG.yaml          a config file (LLaMA-Factory's inference or predict YAML works), or a model folder, a .gguf
                       file or a hub id; without one, the demo model demo:smol
  key=value            overrides after the file, typed as YAML (also --key value)
  --debug              tracebacks and debug logs"""

HELP: dict[str, str] = {
    "chat": f"""\
usage: stoker chat [CONFIG.yaml | MODEL] [key=value ...]

Terminal chat: replies stream token by token, the history is kept (and trimmed to the context). Line editing and
history recall with the arrow keys when stdin is a terminal; piped stdin works too, one message per line.

{CONFIG_ARGS}

in the chat:
  /help                this list          /clear (or clear)    forget the conversation
  /system TEXT         set the system prompt (empty: clear it)
  /image PATH          attach an image to the next message (vision models)
  /video PATH          attach a video to the next message (Qwen-VL models)
  /retry               answer the last message again
  /set KEY VALUE       change a sampling key for the rest of the chat: temperature, top_p, top_k,
                       max_new_tokens, repetition_penalty, seed (/set alone lists them)
  /think on|off        a reasoning model's thinking (enable_thinking)
  /reasoning show|hide show the thinking as it streams, or only the answer
  /stats               tokens and speed of the last reply, and how much of the context the chat uses
  /save FILE           the conversation as OpenAI-style JSON;  /load FILE reads one back
  /exit (or exit)      quit; also Ctrl-D.  Ctrl-C stops a reply, not the chat.

config keys that matter: model_name_or_path, adapter_name_or_path, template, infer_backend, default_system,
  enable_thinking, do_sample, temperature, top_p, top_k, max_new_tokens, repetition_penalty, json_schema

example:
  stoker chat examples/inference/demo_lora.yaml temperature=0.7 do_sample=true
""",
    "webchat": f"""\
usage: stoker webchat [CONFIG.yaml | MODEL] [key=value ...]

Chat in the browser (Gradio): streamed replies, stop, images for vision models.

{CONFIG_ARGS}

config keys that matter: the chat keys (see stoker chat --help), gradio_server_name, gradio_server_port,
  gradio_share
environment: GRADIO_SERVER_NAME (default 127.0.0.1), GRADIO_SERVER_PORT (7860), GRADIO_SHARE

example:
  GRADIO_SERVER_PORT=7861 stoker webchat examples/inference/demo.yaml
""",
    "api": f"""\
usage: stoker api [CONFIG.yaml | MODEL] [key=value ...]

An OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models, /tokenize, /detokenize,
/metrics, /health. Concurrent requests are batched together; each LoRA adapter is its own model id.

{CONFIG_ARGS}

config keys that matter: the chat keys (see stoker chat --help), max_num_seqs, max_batch_tokens, max_queue,
  api_strict_model, api_max_body_mb
environment: API_HOST (default 0.0.0.0), API_PORT (8000), API_KEY (Bearer key required when set),
  API_MODEL_NAME, API_MAX_BODY_MB (64)

example:
  API_PORT=8000 API_KEY=secret stoker api examples/api/demo_api.yaml
  curl -s 127.0.0.1:8000/v1/models -H 'Authorization: Bearer secret'
""",
    "predict": f"""\
usage: stoker predict [CONFIG.yaml] [key=value ...]

Batch generation over datasets: generated_predictions.jsonl plus BLEU/ROUGE metrics (predict_results.json), written
atomically, resumable after a kill, data-parallel over the visible GPUs.

{CONFIG_ARGS}

config keys that matter: eval_dataset (comma list), dataset_dir, max_samples, cutoff_len, output_dir,
  overwrite_output_dir, on_bad_row (error, skip), max_new_tokens, the sampling keys, json_schema,
  per_device_eval_batch_size (read, never a throttle), max_num_seqs
environment: CUDA_VISIBLE_DEVICES, NPROC_PER_NODE, FORCE_TORCHRUN (as llamafactory-cli train reads them)

example:
  stoker predict examples/predict/demo_predict.yaml max_samples=20
""",
    "train": f"""\
usage: stoker train CONFIG.yaml [key=value ...]

LLaMA-Factory compatibility: a config with do_predict: true (and predict_with_generate) runs stoker predict.
Stoker does not train; any other config is refused with the reason.

{CONFIG_ARGS}

example:
  stoker train examples/predict/llama3_lora_predict.yaml
""",
    "check": f"""\
usage: stoker check [CONFIG.yaml | MODEL] [key=value ...]

Print the resolved settings, where each came from (file, command line, environment, default) and what would load.
Loads nothing.

{CONFIG_ARGS}

example:
  stoker check examples/inference/demo_lora.yaml temperature=0.5
""",
    "version": """\
usage: stoker version   (also stoker --version, stoker -V)

Print Stoker's version.
""",
}
