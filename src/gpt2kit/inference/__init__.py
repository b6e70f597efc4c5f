"""Running a model forward: the KV cache, sampling, generation over a running batch, scoring and
hidden-state features. Plain PyTorch over model.py; fast paths come from kernels/, applied by the
API."""
