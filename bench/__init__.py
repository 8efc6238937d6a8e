"""``python -m bench``: throughput and latency of the raw engine, the full stack and `transformers serve`."""
