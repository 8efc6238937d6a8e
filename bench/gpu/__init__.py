"""``make gpu-check`` (``python -m bench.gpu``): the service on a real-size model on one NVIDIA GPU.

Builds Qwen3-VL-2B's architecture from its public config with random weights (no download), runs the
in-process engine and the model service (and the api) on CUDA in bf16, and writes a markdown report: decode
tokens/s against the weight-read bound, the HTTP paths against the raw engine, TTFT of a 1024x1024 image,
and text / image / video requests. ``--cpu-dry-run`` runs the same flow on the tiny architecture on CPU.
"""
