"""Triton kernels, each beside its PyTorch reference: store attention (decode and chunk),
compression (window scoring, logit errors) and the static-layout decode kernel of the TensorRT
plugin. Modules here import only core/ and config; triton itself is optional (`_triton.HAS_TRITON`)."""
