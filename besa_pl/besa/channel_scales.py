"""The learned part of BESA under N:M structure: a scale per input channel that re-ranks each group.

Under N:M (every group of M consecutive inputs of a row keeps N weights) the pruning rate of
every row is fixed, so BESA's allocation (paper Sec. 3.2) has nothing to learn. What is left to
choose is *which* N weights of each group stay. One-shot scores (Wanda's |W| ||X||) rank them
layer by layer, blind to how the block's output depends on each input channel. Here, in the
spirit of BESA (few parameters per layer, trained on the block's reconstruction loss, Eq. 2):

    keep the N of every M weights with the largest  log score[r, j] + log_scale[j],

one learned `log_scale` per input channel j of each linear (init 0 = the one-shot ranking). The
forward pass uses the hard top-N mask; the gradient reaches the scales through a soft mask,
sigmoid((z - tau) / T), with tau midway between each group's N-th and (N+1)-th scores
(straight-through, as BESA's own masks; Bengio et al., 2013). By default the closed-form part that
follows (`closedform/reconstruction.py`, `--model.reconstruct obs`) keeps the learned masks; with
`obs_select` it re-chooses N of M by the OBS saliency times the learned scales
(`ChannelScales.column_weight`), which did worse on held-out text.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from besa_pl.besa.allocation import straight_through


class ChannelScales(nn.Module):
    """Learnable N:M mask of one linear weight: one-shot scores re-ranked by per-channel scales.

    A `torch.nn.utils.parametrize` parametrization: `forward(weight)` returns the masked weight.
    """

    def __init__(self, scores: Tensor, n: int, m: int, temperature: float = 1.0) -> None:
        super().__init__()
        rows, columns = scores.shape
        if columns % m:
            raise ValueError(f"{columns} input features are not a multiple of M={m}")
        self.n, self.m, self.temperature = n, m, temperature
        self.rows, self.columns = rows, columns
        tiny = torch.finfo(torch.float32).tiny  # a zero score (dead input) ranks last, not -inf
        log_scores = scores.detach().float().clamp_min(tiny).log().reshape(rows, columns // m, m)
        self.register_buffer("log_scores", log_scores, persistent=False)
        self.log_scale = nn.Parameter(torch.zeros(columns, device=scores.device))

    def _grouped_scores(self) -> Tensor:
        return self.log_scores + self.log_scale.view(1, -1, self.m)

    def _hard(self, z: Tensor) -> Tensor:
        """The top N of every group (ties: the lower column), as a bool tensor shaped like z."""
        keep = torch.topk(z, self.n, dim=-1).indices
        return torch.zeros_like(z, dtype=torch.bool).scatter_(-1, keep, True)

    def hard_mask(self, counts: Tensor | None = None) -> Tensor:
        """The keep-mask (rows x columns, bool) of the current scales; `counts` is unused (N:M fixes them)."""
        with torch.no_grad():
            return self._hard(self._grouped_scores()).reshape(self.rows, self.columns)

    def mask(self) -> Tensor:
        """Straight-through mask: forward value the hard top-N mask, gradient via the soft one."""
        z = self._grouped_scores()
        with torch.no_grad():
            top = torch.topk(z, self.n + 1, dim=-1).values
            tau = (top[..., self.n - 1 : self.n] + top[..., self.n : self.n + 1]) / 2
        soft = torch.sigmoid((z - tau) / self.temperature)
        return straight_through(self._hard(z.detach()), soft).reshape(self.rows, self.columns)

    def forward(self, weight: Tensor) -> Tensor:
        with torch.autocast(weight.device.type, enabled=False):
            return weight * self.mask().to(weight.dtype)

    def column_weight(self) -> Tensor:
        """exp(2 log_scale) per input column: the factor on the OBS saliency w^2 / [H^-1]_jj, which is
        quadratic in the weight as the squared score is (fp32, detached)."""
        return torch.exp(2 * self.log_scale.detach().float())

    def rate(self) -> float:
        return 1.0 - self.n / self.m

    def expected_sparsity(self) -> Tensor:
        """Exactly 1 - N/M whatever the scales: the sparsity penalty is 0 and has no gradient."""
        return torch.tensor(self.rate(), device=self.log_scale.device)

    def row_alpha(self) -> Tensor:
        return torch.full((self.rows,), self.rate(), device=self.log_scale.device)
