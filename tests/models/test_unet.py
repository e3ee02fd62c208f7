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


def test_reusing_context_gives_identical_outputs_and_projects_each_context_once(monkeypatch):
    from stablexl.models import unet as U

    unet, x, ctx, y = _unet_and_inputs()
    via_context = [unet(x * s, t, ctx, y) for s, t in ((1.0, 900), (0.5, 500), (0.2, 100))]
    monkeypatch.setattr(U, "via_context_is_cheaper", lambda *a: False)  # compare with the same arithmetic
    calls = _count_context_projections(unet)
    n_cross = sum(1 for name, _ in unet.named_modules() if name.endswith("attn2"))
    with torch.no_grad():
        plain = [unet(x * s, t, ctx, y) for s, t in ((1.0, 900), (0.5, 500), (0.2, 100))]
        assert calls[0] == 3 * n_cross
        calls[0] = 0
        with unet.reusing_context():
            reused = [unet(x * s, t, ctx, y) for s, t in ((1.0, 900), (0.5, 500), (0.2, 100))]
        assert calls[0] == n_cross  # projected on the first call only
    for a, b, c in zip(plain, reused, via_context):
        assert torch.equal(a, b)
        torch.testing.assert_close(c.detach(), b, rtol=1e-5, atol=1e-5)


def test_reuse_follows_a_new_or_modified_context_and_ends_with_the_scope(monkeypatch):
    from stablexl.models import unet as U

    monkeypatch.setattr(U, "via_context_is_cheaper", lambda *a: False)  # compare with the same arithmetic
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


def test_attention_via_context_equals_projecting_the_context_first():
    from stablexl.models.layers import attention, attention_via_context

    g = torch.Generator().manual_seed(0)
    for b, n, m, heads, d, c in ((2, 16, 77, 2, 64, 192), (3, 4, 77, 5, 8, 48), (1, 1, 7, 1, 4, 3)):
        q = torch.randn(b, n, heads * d, generator=g)
        ctx = torch.randn(b, m, c, generator=g)
        wk, wv = torch.randn(heads * d, c, generator=g) / c**0.5, torch.randn(heads * d, c, generator=g) / c**0.5
        want = attention(q, ctx @ wk.T, ctx @ wv.T, heads)
        got = attention_via_context(q, ctx, wk, wv, heads)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        half = attention_via_context(q.half(), ctx.half(), wk.half(), wv.half(), heads, upcast=True)
        assert half.dtype == torch.float16
        torch.testing.assert_close(half.float(), want, rtol=1e-2, atol=1e-2)


def test_the_cheaper_cross_attention_form_is_chosen_by_size():
    from stablexl.models.layers import via_context_is_cheaper

    # the miniature's 4x4 and 2x2 levels (77 context tokens of width 192, 128 channels, 2 heads)
    assert via_context_is_cheaper(16, 77, 128, 192, 2) and via_context_is_cheaper(4, 77, 128, 192, 2)
    # SDXL at 1024 px: 32x32 and 64x64 latent levels, context 2048 wide
    assert not via_context_is_cheaper(1024, 77, 1280, 2048, 20) and not via_context_is_cheaper(4096, 77, 640, 2048, 10)


def test_unet_training_step_is_the_same_in_both_cross_attention_forms(monkeypatch):
    from stablexl.models import unet as U

    unet, x, ctx, y = _unet_and_inputs(batch=3)
    unet.train()

    def step():
        unet.zero_grad(set_to_none=True)
        out = unet(x, torch.tensor([10.0, 500.0, 990.0]), ctx, y)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}

    calls = []
    real = U.via_context_is_cheaper
    monkeypatch.setattr(U, "via_context_is_cheaper", lambda *a: calls.append(a) or real(*a))
    out_a, grads_a = step()
    assert any(real(*a) for a in calls)  # the tiny model at 8x8 latents takes the reassociated form
    monkeypatch.setattr(U, "via_context_is_cheaper", lambda *a: False)
    out_b, grads_b = step()
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)
