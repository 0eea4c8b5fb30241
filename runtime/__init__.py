"""ERDE runtime: torch-free early-exit inference with onnxruntime, numpy and Pillow."""
