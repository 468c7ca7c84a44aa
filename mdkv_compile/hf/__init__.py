"""Hugging Face transformers integration: patching a model, calibration, CUDA-graph decoding."""
