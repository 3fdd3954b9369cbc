"""Interoperability with the file formats of other inference systems (GGUF: llama.cpp, Ollama)."""
