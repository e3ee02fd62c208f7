"""UNet behaviour that the diffusers parity tests do not see: reusing the context's keys/values while sampling."""

import torch

from stablexl.config import PRESETS
from stablexl.models.parts import build_parts


def _unet_and_inputs(batch: int = 2):
    torch.manual_seed(0)
    unet = build_parts(PRESETS["tiny-sdxl"], device="cpu").unet.eval()
    cfg = unet.config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, 8, 8, generator=g)
    ctx = torch.randn(batch, 77, cfg.context_dim, generator=g)
    y = torch.randn(batch, cfg.vector_dim, generator=g)
    return unet, x, ctx, y


def _count_context_projections(unet) -> list[int]:
    calls = [0]
    for name, m in unet.named_modules():
        if name.endswith("attn2.to_k"):
            m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_reusing_context_gives_identical_outputs_and_projects_each_context_once():
    unet, x, ctx, y = _unet_and_inputs()
    calls = _count_context_projections(unet)
    n_cross = sum(1 for name, _ in unet.named_modules() if name.endswith("attn2"))
    with torch.no_grad():
        plain = [unet(x * s, t, ctx, y) for s, t in ((1.0, 900), (0.5, 500), (0.2, 100))]
        assert calls[0] == 3 * n_cross
        calls[0] = 0
        with unet.reusing_context():
            reused = [unet(x * s, t, ctx, y) for s, t in ((1.0, 900), (0.5, 500), (0.2, 100))]
        assert calls[0] == n_cross  # projected on the first call only
    for a, b in zip(plain, reused):
        assert torch.equal(a, b)


def test_reuse_follows_a_new_or_modified_context_and_ends_with_the_scope():
    unet, x, ctx, y = _unet_and_inputs()
    other = torch.randn_like(ctx)
    with torch.no_grad():
        want_ctx, want_other = unet(x, 500, ctx, y), unet(x, 500, other, y)
        with unet.reusing_context():
            assert torch.equal(unet(x, 500, ctx, y), want_ctx)
            assert torch.equal(unet(x, 500, other, y), want_other)  # another tensor: projected anew
            c = ctx.clone()
            assert torch.equal(unet(x, 500, c, y), want_ctx)
            c.copy_(other)  # the same tensor object, changed in place
            assert torch.equal(unet(x, 500, c, y), want_other)
    assert all(m._reused is None for name, m in unet.named_modules() if name.endswith("attn2"))


def test_no_reuse_under_autograd():
    unet, x, ctx, y = _unet_and_inputs()
    calls = _count_context_projections(unet)
    with unet.reusing_context():
        for _ in range(2):  # two graphs, each with its own projections: both backward passes work
            unet(x, 500, ctx, y).square().mean().backward()
    n_cross = sum(1 for name, _ in unet.named_modules() if name.endswith("attn2"))
    assert calls[0] == 2 * n_cross
