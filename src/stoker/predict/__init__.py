"""Batch prediction over datasets (``stoker predict``), compatible with LLaMA-Factory's predict YAMLs.

Modules, from the data up:

- ``dataset_info``: parse ``dataset_info.json`` entries (LLaMA-Factory's format) into ``DatasetSpec``;
- ``readers``: raw rows from local json/jsonl/csv/parquet/arrow/txt files, folders of them, or the HF hub;
- ``examples``: one row -> ``Example`` (OpenAI-style prompt messages, label, tools, media);
- ``data``: ``load_datasets`` ties those together and applies ``max_samples`` and ``on_bad_row``;
- ``metrics``: BLEU-4 and ROUGE exactly as LLaMA-Factory computes them;
- ``writer``: append-as-you-go part files, resume bookkeeping, the ordered final file and the results JSON;
- ``prompts``: examples -> engine requests through the chat service, long prompts cut to ``cutoff_len``;
- ``ranks``: data-parallel processes (torchrun or ``NPROC_PER_NODE``), and how they agree on failures;
- ``runner``: ``run_predict(settings)``, what ``stoker predict`` and ``stoker train`` (do_predict) call;
- ``worker``: the entry point of the processes ``NPROC_PER_NODE`` starts.

No module imports torch or transformers at import time; they load when a run starts.
"""
