"""What runs a model: the decoder, its caches and attention, generation, batching, quantization, speculative
decoding and the CPU kernels. Imports torch and its own kernels, never the bench or the reports."""
