"""The learned method (BESA, Xu et al., ICLR 2024): candidate rates and masks, the block wrapper
whose only parameters are its sparsity logits, the block loss, and the LightningModule."""
