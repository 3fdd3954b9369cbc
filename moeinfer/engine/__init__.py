"""Generation: prefill/decode over a preallocated KV cache, sampling, stopping, routing traces."""
