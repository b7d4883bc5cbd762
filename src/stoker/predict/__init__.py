"""Batch prediction over datasets (``stoker predict``), compatible with LLaMA-Factory's predict YAMLs.

Modules, from the data up:

- ``dataset_info``: parse ``dataset_info.json`` entries (LLaMA-Factory's format) into ``DatasetSpec``;
- ``readers``: raw rows from local json/jsonl/csv/parquet/arrow/txt files, folders of them, or the HF hub;
- ``examples``: one row -> ``Example`` (OpenAI-style prompt messages, label, tools, media);
- ``data``: ``load_datasets`` ties those together and applies ``max_samples`` and ``on_bad_row``;
- ``metrics``: BLEU-4 and ROUGE exactly as LLaMA-Factory computes them;
- ``writer``: append-as-you-go part files, resume bookkeeping, the ordered final file and the results JSON.

Nothing here imports torch or transformers; the runner that drives an engine imports them when it runs.
"""
