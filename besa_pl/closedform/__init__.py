"""The closed-form part (no training): damping, SparseGPT's OBS sweep, the masked least-squares
solve, in-row swaps, and the driver that reconstructs a block once its masks are final."""
