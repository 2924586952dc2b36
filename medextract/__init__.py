"""medextract: the library under this project's scripts.

The chapter's scripts (data_helper.py, train.py, merge_params.py, predict.py, test_qwen.py, test_openai.py) and
ours (evaluate.py, export_qwen2.py, serve.py) stay thin: argument parsing and a main(). What they share beyond
utils.py lives here, one module per concept:

- engine: the batched generation engine (scheduling and refill, the model step, sampling, grammar masks)
- grammar: the answer grammar (xgrammar) that keeps answers valid and list items grounded in the dialogue
- inference: model directories checked and loaded, run settings, extraction over a JSON Lines file
- checkpoints / training: train.py's checkpoints, resume state and the QLoRA/DeepSpeed building blocks
- model_files: header checks of weights, adapters and the tokenizer vocabulary
- service: the OpenAI-compatible HTTP service behind serve.py
- grammar_pool: the service's grammar work, bounded: clients' grammars vetted in worker processes, an LRU
  of compiled grammars
- cli / terminal: the flags several scripts share, and the interactive loop
- api: the Python API, `Extractor`
- errors: the typed errors everything here raises (nothing here exits the process)
"""
from __future__ import annotations

__all__ = ["Extractor", "Extraction", "Span"]


def __getattr__(name: str):
    # imported on first use, so that `import medextract.grammar` does not load torch and the model code
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'medextract' has no attribute {name!r}")
