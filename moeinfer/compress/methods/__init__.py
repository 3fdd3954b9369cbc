"""Compression methods, one module per family; each registers itself with `register_method`."""
