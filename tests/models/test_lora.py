"""LoRA (Hu et al. 2021): starts at the base model, trains only adapters, merges exactly."""

from __future__ import annotations

import pytest
import torch

from ldm.models.lora import LoRALinear, add_lora, lora_state_dict, merge_lora
from ldm.models.unet import UNetModel

UNET = dict(
    in_channels=4,
    out_channels=4,
    model_channels=32,
    channel_mult=[1, 2],
    num_res_blocks=1,
    attention_resolutions=[1],
    num_heads=4,
    context_dim=16,
)


def inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([3.0, 700.0]),
        torch.randn(2, 5, 16, generator=g),
    )


def test_lora_starts_at_base_trains_adapters_only_and_merges() -> None:
    torch.manual_seed(0)
    unet = UNetModel(**UNET)
    with torch.no_grad():  # SD zero-initialises output layers; make every layer count
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    base_keys = set(unet.state_dict())
    x, t, ctx = inputs()
    with torch.no_grad():
        before = unet(x, t, context=ctx)
    names = add_lora(unet, rank=4, alpha=8.0)
    assert names and all(isinstance(unet.get_submodule(n), LoRALinear) for n in names)
    blocks = sum(type(m).__name__ == "BasicTransformerBlock" for m in unet.modules())
    assert len(names) == 8 * blocks  # attn1/attn2 × to_q, to_k, to_v, to_out.0 per block
    assert base_keys <= set(unet.state_dict())  # base names unchanged
    assert set(unet.state_dict()) - base_keys == set(lora_state_dict(unet))
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    with torch.no_grad():
        assert torch.equal(unet(x, t, context=ctx), before)  # B = 0
        for n in names:
            torch.nn.init.normal_(unet.get_submodule(n).lora_up.weight, std=0.1)
        adapted = unet(x, t, context=ctx)
    assert not torch.allclose(adapted, before)
    assert merge_lora(unet) == len(names)
    assert set(unet.state_dict()) == base_keys
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, context=ctx), adapted, rtol=1e-5, atol=1e-5)


def test_a_pattern_that_matches_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match="matches no linear layer"):
        add_lora(UNetModel(**UNET), rank=2, targets=["*.to_z"])
