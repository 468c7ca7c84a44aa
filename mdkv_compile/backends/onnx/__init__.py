"""ONNX export of a compressed decode step, its ONNX Runtime generator and the `mdkv export` command."""
