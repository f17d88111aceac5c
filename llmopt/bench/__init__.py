"""How the engine is measured: workloads, the measurement loop and its statistics, one experiment module per
notebook, peers (transformers, llama.cpp) and the record of the machine each result was taken on."""
