"""Gene-DML against the reference model's definitions (method.md §1.2): embeddings after fusion, reference
layer details, and proportional attention for pooled local tokens."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from genedml.heads.batch import Batch
from genedml.heads.gene_dml import GeneDMLModel, GeneDMLSettings, _masked_mean
from genedml.heads.layers import Attention, FusionEncoder, feed_forward
from genedml.heads.losses import instance_loss

D, E, G = 6, 8, 5


def _model(**kw) -> GeneDMLModel:
    torch.manual_seed(0)
    settings = GeneDMLSettings(dim=E, neighbor_depth=1, neighbor_heads=2, global_depth=1, global_heads=2,
                               groups=2, **kw)
    return GeneDMLModel(settings, D, G).eval()


def _toy_input(model: GeneDMLModel, b: int) -> tuple[dict[str, torch.Tensor], Batch]:
    """One token per scale, fed to the fusion directly (the scale encoders are bypassed)."""
    tokens = {name: torch.randn(b, 1, E) for name in ("local", "neighbor", "global")}
    ones = torch.ones(b, 1, dtype=torch.bool)
    model.encode_scales = lambda batch: {k: (v, ones) for k, v in tokens.items()}  # type: ignore[method-assign]
    batch = Batch(local=torch.zeros(b, 1, D), neighbor=None, neighbor_mask=None, slide_tokens=[], slide_grid=[],
                  slot=torch.zeros(b, dtype=torch.long), slide_pos=torch.arange(b))
    return tokens, batch


def test_instance_embeddings_are_per_scale_means_of_the_fused_tokens() -> None:
    """A 3-token toy input (one token per scale): t, n, gl must be the fused tokens, f their mean."""
    model = _model()
    b = 4
    tokens, batch = _toy_input(model, b)
    out = model(batch)
    by_hand = model.fusion(torch.cat(list(tokens.values()), dim=1), torch.ones(b, 3, dtype=torch.bool))
    for i, name in enumerate(("local", "neighbor", "global")):
        torch.testing.assert_close(out["emb"][name], F.normalize(by_hand[:, i], dim=-1))
        assert not torch.allclose(out["emb"][name], F.normalize(tokens[name][:, 0], dim=-1))  # not pre-fusion
    torch.testing.assert_close(out["f"], by_hand.mean(dim=1))


def test_instance_loss_trains_the_fusion_encoder() -> None:
    model = _model()
    model.train()
    b = 6
    _, batch = _toy_input(model, b)
    y = torch.randn(b, G)
    out = model(batch, y)
    instance_loss(list(out["emb"].values()), out["g"], 0.07).backward()
    grads = [p.grad for p in model.fusion.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_reference_layer_details() -> None:
    one_head = Attention(E, heads=1, dropout=0.1)
    assert one_head.qkv.bias is None and isinstance(one_head.out, torch.nn.Identity)
    two_heads = Attention(E, heads=2, dropout=0.1)
    assert isinstance(two_heads.out[0], torch.nn.Linear) and isinstance(two_heads.out[1], torch.nn.Dropout)
    ff = feed_forward(E, 2 * E, 0.1)
    assert isinstance(ff[-1], torch.nn.Dropout) and ff[-1].p == 0.1
    model = _model()
    gene_ff = model.gene_encoder[1]
    assert isinstance(gene_ff[-1], torch.nn.Dropout) and gene_ff[-1].p == 0.1
    # Attention probabilities are not dropped: two training-mode passes agree when the output dropout is off.
    attn = Attention(E, heads=2, dropout=0.0).train()
    x = torch.randn(3, 5, E)
    torch.testing.assert_close(attn(x), attn(x))


def test_proportional_attention_on_pooled_regions_equals_the_full_token_sequence() -> None:
    """When every pooled region holds identical tokens, CLS + 4 pooled tokens weighted by their token counts
    give exactly the fused mean of the full CLS + 16-token sequence (the `all` layout)."""
    torch.manual_seed(1)
    fusion = FusionEncoder(E, depth=1, heads=1, mlp_dim=2 * E, dropout=0.0).eval()
    b = 3
    cls, regions = torch.randn(b, 1, E), torch.randn(b, 4, E)
    other = torch.randn(b, 2, E)  # e.g. neighbour and global tokens
    full = torch.cat([cls, regions.repeat_interleave(4, dim=1), other], dim=1)  # 1 + 16 + 2 tokens
    pooled = torch.cat([cls, regions, other], dim=1)  # 1 + 4 + 2 tokens
    weights = torch.tensor([1.0, 4, 4, 4, 4, 1, 1])
    valid_full = torch.ones(b, full.shape[1], dtype=torch.bool)
    valid_pooled = torch.ones(b, pooled.shape[1], dtype=torch.bool)
    f_full = _masked_mean(fusion(full, valid_full), valid_full)
    f_pooled = _masked_mean(fusion(pooled, valid_pooled, weights), valid_pooled, weights)
    torch.testing.assert_close(f_pooled, f_full, rtol=1e-5, atol=1e-5)
    unweighted = _masked_mean(fusion(pooled, valid_pooled), valid_pooled)
    assert not torch.allclose(unweighted, f_full, atol=1e-3)  # without the weights the balance is wrong


def test_masked_neighbour_tiles_stay_out_of_fusion_and_means() -> None:
    torch.manual_seed(2)
    fusion = FusionEncoder(E, depth=1, heads=1, mlp_dim=2 * E, dropout=0.0).eval()
    tokens = torch.randn(2, 5, E)
    valid = torch.tensor([[True, True, False, True, True]] * 2)
    changed = tokens.clone()
    changed[:, 2] = 100.0
    a = _masked_mean(fusion(tokens, valid), valid)
    b = _masked_mean(fusion(changed, valid), valid)
    torch.testing.assert_close(a, b)
    assert np.isfinite(a.detach().numpy()).all()
