"""DeepSeek-V2/V3 adapters are registered here (filled in with MLA support)."""
