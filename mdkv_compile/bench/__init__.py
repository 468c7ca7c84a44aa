"""Benchmarks behind `mdkv bench`: decode attention kernels (decode.py) and end-to-end runs (e2e.py)."""
