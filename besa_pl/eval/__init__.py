"""Fit-end evaluation: perplexity, zero-shot, the hardware model, the results table and plots."""
