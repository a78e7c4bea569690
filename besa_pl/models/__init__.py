"""Model access: where models come from, weights read block by block, calling a block, memory."""
