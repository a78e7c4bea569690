"""One-shot pruning: importance statistics, and magnitude / Wanda / SparseGPT as published."""
