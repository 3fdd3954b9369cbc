"""GGUF in and out: moeinfer models written for llama.cpp, and llama.cpp's GGUF files run in moeinfer.

- `export_gguf(model, path, quant=...)`: one .gguf file (moeinfer.loading.gguf.export);
- `load_gguf(path)`: a MoEModel from a .gguf file (moeinfer.loading.gguf.load);
- `gguf_config(path)`: its config.json fields, from the metadata (what `read_config` returns for it).
Both use the `gguf` package, llama.cpp's own Python reader and writer.
"""

from __future__ import annotations

from moeinfer.loading.gguf.errors import GGUFError
from moeinfer.loading.gguf.export import QUANT_CHOICES, ExportReport, export_gguf, fold_merged_routers_
from moeinfer.loading.gguf.load import gguf_config, load_gguf

__all__ = ["GGUFError", "QUANT_CHOICES", "ExportReport", "export_gguf", "fold_merged_routers_", "gguf_config",
           "load_gguf"]
