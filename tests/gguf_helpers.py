"""GGUF test helpers: a tokenizer alone through a GGUF file."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def tokenizer_through_gguf(tokenizer: Any, path: Path, *, arch: str, vocab_size: int) -> tuple[Any, Any]:
    """Write only `tokenizer`'s keys to a GGUF file of architecture `arch`, read them back:
    (the rebuilt tokenizer, the gguf reader)."""
    import gguf

    from moeinfer.loading.gguf.archmap import Metadata
    from moeinfer.loading.gguf.vocab import read_tokenizer, write_tokenizer

    writer = gguf.GGUFWriter(path, arch)
    write_tokenizer(writer, tokenizer, vocab_size)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = gguf.GGUFReader(path)
    return read_tokenizer(Metadata(reader.fields, str(path))), reader
