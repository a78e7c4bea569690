"""BESA's block objective: the channel-normalised reconstruction error and the sparsity penalty."""

import pytest
import torch

from besa_pl.besa.loss import (
    channel_norms_squared,
    reconstruction_loss,
    sparsity_penalty,
)


def _outputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(3, 7, 5, generator=g) * torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0])
    return target + 0.1 * torch.randn(3, 7, 5, generator=g), target


def test_the_loss_is_each_channels_relative_squared_error_averaged_over_channels():
    output, target = _outputs()
    y, y_hat = target.reshape(-1, 5), output.reshape(-1, 5)
    by_hand = sum(((y[:, h] - y_hat[:, h]).pow(2).sum() / y[:, h].pow(2).sum()) for h in range(5)) / 5
    assert float(reconstruction_loss(output, target)) == pytest.approx(float(by_hand), rel=1e-5)


def test_rescaling_a_channel_leaves_the_loss_unchanged():
    output, target = _outputs()
    scale = torch.tensor([1.0, 100.0, 1.0, 0.01, 1.0])
    assert float(reconstruction_loss(output * scale, target * scale)) == pytest.approx(
        float(reconstruction_loss(output, target)), rel=1e-5
    )


def test_shared_norms_make_the_loss_add_up_over_parts_of_a_micro_batch():
    """What DDP relies on: with the norms summed over all ranks' samples, the ranks' losses sum to the
    loss of one process holding every sample."""
    output, target = _outputs()
    norms = channel_norms_squared(target[:2]) + channel_norms_squared(target[2:])
    parts = reconstruction_loss(output[:2], target[:2], norms) + reconstruction_loss(output[2:], target[2:], norms)
    assert float(parts) == pytest.approx(float(reconstruction_loss(output, target)), rel=1e-5)


def test_the_gradient_is_each_channels_error_over_its_norm():
    """d loss / d output = 2 (y_hat - y) / (H nu_h^2): what the logits are trained with."""
    output, target = _outputs()
    output.requires_grad_(True)
    reconstruction_loss(output, target).backward()
    expected = 2 * (output.detach() - target) / (5 * channel_norms_squared(target))
    assert torch.allclose(output.grad, expected, rtol=1e-4, atol=1e-7)


def test_penalty_forms():
    expected = torch.tensor(0.55)
    assert float(sparsity_penalty(torch.tensor(0.5), 0.5)) == 0.0
    assert float(sparsity_penalty(expected, 0.5, 5.0, "relative")) == pytest.approx(5.0 * (0.05 / 0.5) ** 2)
    assert float(sparsity_penalty(expected, 0.5, 5.0, "absolute")) == pytest.approx(5.0 * 0.05**2)
    # at a 50% target, the code's relative form with weight 5 is the paper's absolute form with weight 20
    assert float(sparsity_penalty(expected, 0.5, 5.0, "relative")) == pytest.approx(
        float(sparsity_penalty(expected, 0.5, 20.0, "absolute"))
    )
