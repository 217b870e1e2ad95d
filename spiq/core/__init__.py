"""The primitives every layer above shares: the one uniform fake quantization and the quantized
modules (quant), tensor layouts (tensors), SQNR and checksums (metrics), forward hooks (hooks)."""
