"""Exact rewrites of the float model before quantization: BatchNorm folding, cross-layer equalization."""
