"""One-shot baselines: per-row counts, SparseGPT's OBS update and its damping retry."""

import torch

from besa_pl.closedform.damping import damped_inverse_cholesky
from besa_pl.oneshot.baselines import keep_mask_from_scores, sparsegpt_prune
from besa_pl.oneshot.importance import InputStatistics


def test_row_and_layer_masks_prune_the_lowest_scores():
    scores = torch.rand(8, 20, generator=torch.Generator().manual_seed(0))
    keep = keep_mask_from_scores(scores, 0.5, "row")
    assert torch.all((~keep).sum(dim=1) == 10)
    assert torch.all(scores[~keep].reshape(8, 10).max(dim=1).values <= scores[keep].reshape(8, 10).min(dim=1).values)
    layer = keep_mask_from_scores(scores, 0.5, "layer")
    assert int((~layer).sum()) == 80 and scores[~layer].max() <= scores[layer].min()


def test_sparsegpt_update_reconstructs_better_than_masking_alone():
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 16, bias=False)
    stats = InputStatistics(linear, gram=True)
    mixing = torch.randn(64, 64, generator=g)
    x = torch.randn(512, 64, generator=g) @ mixing  # correlated inputs: where OBS pays off
    with torch.no_grad():
        linear(x)
    stats.remove()
    weight = linear.weight.detach().clone()
    new_weight, keep, _ = sparsegpt_prune(weight, stats.hessian, 0.5)
    assert int((~keep).sum()) == weight.numel() // 2
    assert torch.all(new_weight[~keep] == 0)
    error_obs = (x @ (weight - new_weight).t()).pow(2).mean()
    error_mask = (x @ (weight - weight * keep).t()).pow(2).mean()
    assert error_obs < 0.8 * error_mask


def test_a_hessian_that_is_not_positive_definite_gets_more_damping_and_a_log_line():
    hessian = torch.ones(4, 4) - 0.02 * torch.eye(4)  # rounding left eigenvalues of -0.02
    messages = []
    upper = damped_inverse_cholesky(hessian, 0.01, log=messages.append)
    assert torch.isfinite(upper).all()
    assert messages and "not positive definite" in messages[0] and "retrying with 10x more" in messages[0]


def test_linears_on_one_input_share_one_gram_with_the_values_each_would_take_alone(tiny_model_dir):
    from besa_pl.models.activations import capture_block_inputs
    from besa_pl.models.loading import decoder_blocks, load_model, prunable_linears
    from besa_pl.oneshot.importance import reference_pass

    model, _ = load_model(str(tiny_model_dir("llama")), "float32")
    tokens = torch.randint(0, 512, (3, 32), generator=torch.Generator().manual_seed(0))
    cache = capture_block_inputs(model, tokens)
    block = decoder_blocks(model)[1]
    _, shared = reference_pass(block, cache.inputs, cache.block_kwargs[1], "cpu", gram=True)
    attn, mlp = "self_attn.{}_proj", "mlp.{}_proj"
    assert shared[attn.format("q")].hessian is shared[attn.format("k")].hessian is shared[attn.format("v")].hessian
    assert shared[mlp.format("gate")].hessian is shared[mlp.format("up")].hessian
    assert shared[attn.format("o")].hessian is not shared[attn.format("q")].hessian
    # Each linear's Gram taken on its own, with no sharing: the same values, bit for bit.
    alone = {name: InputStatistics(linear, gram=True) for name, linear in prunable_linears(block).items()}
    with torch.no_grad():
        for i in range(cache.inputs.shape[0]):
            block(cache.inputs[i : i + 1], **cache.block_kwargs[1])
    for name, stats in alone.items():
        stats.remove()
        assert torch.equal(stats.hessian, shared[name].hessian), name
