"""Quantized linear methods (int8) and the checkpoint formats they load; see `int8` and `compressed_tensors`."""
