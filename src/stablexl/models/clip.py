"""CLIP transformers: the text tower (OpenAI ViT-L/14, OpenCLIP ViT-H/14 and ViT-bigG/14) and the
vision tower (ViT-L/14, ViT-H/14) with their projections to the joint embedding space, and `CLIPModel`,
the two paired for contrastive training and evaluation.

Pre-LN residual blocks, learned absolute positions, causal mask for text. Attribute names follow
transformers' CLIP models (`embeddings`, `encoder.layers.N.self_attn.q_proj`, ..., including its
`pre_layrnorm` spelling), so transformers/diffusers folders load without renaming; OpenCLIP's fused
`in_proj` layout is mapped in `stablexl/io/keymaps.py`. Facts: reference/architecture.md §3.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import CLIPTextConfig, CLIPVisionConfig, component_from_dict
from .layers import activation, attention


class CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor, causal: bool) -> Tensor:
        out = attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=causal)  # (B, T, W)
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.act = activation(act)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPLayer(nn.Module):
    """x += attn(LN x); x += MLP(LN x)."""

    def __init__(self, width: int, heads: int, mlp_dim: int, act: str, eps: float):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.self_attn = CLIPAttention(width, heads)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = CLIPMLP(width, mlp_dim, act)

    def forward(self, x: Tensor, causal: bool) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), causal)  # (B, T, W)
        return x + self.mlp(self.layer_norm2(x))  # (B, T, W)


class CLIPEncoder(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_dim: int, act: str, eps: float):
        super().__init__()
        self.layers = nn.ModuleList(CLIPLayer(width, heads, mlp_dim, act, eps) for _ in range(layers))


# --------------------------------------------------------------------------------------------------
# Text tower
# --------------------------------------------------------------------------------------------------


def _embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding with its default N(0, 1) init, skipped on the meta device: there `normal_` goes through
    torch._refs, whose first use imports torch._dynamo (~2-5 s of every model load)."""
    w = torch.empty(num, dim)  # on the device of the surrounding `with torch.device(...)`
    if w.device.type != "meta":
        nn.init.normal_(w)
    return nn.Embedding(num, dim, _weight=w)


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = _embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = _embedding(cfg.max_length, cfg.width)

    def forward(self, ids: Tensor, extra: Tensor | None = None) -> Tensor:
        """Ids past the vocabulary (V + k) take row k of `extra` (n, W): textual-inversion vectors, looked up
        beside the table rather than appended to it (sd.cpp adds them as custom ids the same way)."""
        pos = torch.arange(ids.shape[1], device=ids.device)
        vocab = self.token_embedding.num_embeddings
        if extra is None:
            return self.token_embedding(ids) + self.position_embedding(pos)[None]  # (B, T, W)
        past = ids >= vocab
        if int(ids.max()) >= vocab + extra.shape[0]:
            raise ValueError(f"token id {int(ids.max())} is past the vocabulary ({vocab}) and the {extra.shape[0]} "
                             "extra vectors given")
        x = self.token_embedding(ids.masked_fill(past, 0))  # (B, T, W)
        rows = extra.to(x.device, x.dtype)[(ids - vocab).clamp(min=0)]  # (B, T, W)
        return torch.where(past[..., None], rows, x) + self.position_embedding(pos)[None]


@dataclass
class TextEncoding:
    hidden: Tensor  # (B, T, W): the requested hidden state
    pooled: Tensor | None  # (B, P): final-normed EOS feature through text_projection, if requested


class CLIPTextModel(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg.width, cfg.layers, cfg.heads, cfg.mlp_dim, cfg.activation, cfg.eps)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False) if cfg.projection_dim else None

    def forward(self, ids: Tensor, layer: int | None = None, final_norm: bool = True, pooled: bool = False,
                extra: Tensor | None = None) -> TextEncoding:
        """Run the tower on token ids (B, T); ids past the vocabulary index `extra` (n, W) (textual inversion).

        `layer` = number of transformer blocks whose output is returned as `hidden` (transformers'
        `hidden_states[layer]`; default all), optionally through the final LayerNorm. `pooled` runs all
        blocks and returns final_layer_norm(last)[EOS] @ projection; EOS is found as argmax of the ids
        (OpenCLIP/OpenAI convention: `<|endoftext|>` = 49407 is the largest id), extra ids left out: A1111
        and ComfyUI pool at the EOS token with embeddings in the prompt too (transformers with the legacy
        `eos_token_id: 2` of the SD configs would pool at the first extra id instead).
        """
        cfg = self.config
        n_layers = len(self.encoder.layers)
        layer = n_layers if layer is None else layer
        if not 0 <= layer <= n_layers:
            raise ValueError(f"layer must be in [0, {n_layers}], got {layer}")
        if ids.ndim != 2 or ids.shape[1] > cfg.max_length:
            raise ValueError(f"token ids must be (B, T) with T <= {cfg.max_length}; got {tuple(ids.shape)}")
        if pooled and self.text_projection is None:
            raise ValueError("this text encoder has no text_projection, so it cannot give a pooled embedding")
        x = self.embeddings(ids, extra)  # (B, T, W)
        hidden = x
        run = n_layers if pooled else layer
        for i, block in enumerate(self.encoder.layers[:run]):
            x = block(x, causal=True)  # (B, T, W)
            if i + 1 == layer:
                hidden = x
        if final_norm:
            hidden = self.final_layer_norm(hidden)
        pool = None
        if pooled:
            last = self.final_layer_norm(x)  # (B, T, W)
            in_vocab = ids.masked_fill(ids >= self.embeddings.token_embedding.num_embeddings, -1)
            eos = last[torch.arange(ids.shape[0], device=ids.device), in_vocab.argmax(dim=-1)]  # (B, W)
            pool = self.text_projection(eos)  # (B, P)
        return TextEncoding(hidden, pool)


# --------------------------------------------------------------------------------------------------
# Vision tower
# --------------------------------------------------------------------------------------------------


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.width))
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2 + 1, cfg.width)

    def forward(self, pixels: Tensor) -> Tensor:
        p = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (B, W, g, g)
        p = p.flatten(2).transpose(1, 2)  # (B, g*g, W)
        cls = self.class_embedding.expand(p.shape[0], 1, -1)  # (B, 1, W)
        return torch.cat([cls, p], dim=1) + self.position_embedding.weight[None]  # (B, 1+g*g, W)


class CLIPVisionModel(nn.Module):
    """ViT: normalised pixels (B, 3, 224, 224) -> image embedding (B, projection_dim)."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=cfg.eps)  # (sic) transformers' checkpoint name
        self.encoder = CLIPEncoder(cfg.width, cfg.layers, cfg.heads, cfg.mlp_dim, cfg.activation, cfg.eps)
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.visual_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    def normalize(self, images: Tensor) -> Tensor:
        """[0, 1] RGB (B, 3, S, S) -> CLIP-normalised pixels."""
        mean = torch.tensor(self.config.mean, device=images.device, dtype=images.dtype)[None, :, None, None]
        std = torch.tensor(self.config.std, device=images.device, dtype=images.dtype)[None, :, None, None]
        return (images - mean) / std

    def forward(self, pixels: Tensor) -> Tensor:
        s = self.config.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (3, s, s):
            raise ValueError(f"vision tower expects normalised pixels (B, 3, {s}, {s}); got {tuple(pixels.shape)}")
        x = self.pre_layrnorm(self.embeddings(pixels))  # (B, 1+g*g, W)
        for block in self.encoder.layers:
            x = block(x, causal=False)
        return self.visual_projection(self.post_layernorm(x[:, 0]))  # (B, P)


class CLIPModel(nn.Module):
    """Contrastive CLIP: one ViT image tower and one or more text towers, each with its own learned
    temperature (Radford et al. 2021, Fig. 3: logit_scale initialised to log(1/0.07))."""

    def __init__(self, vision: CLIPVisionConfig, texts: list[CLIPTextConfig]):
        super().__init__()
        for t in texts:
            if t.projection_dim != vision.projection_dim:
                raise ValueError(f"text tower projection {t.projection_dim} must equal the image tower's "
                                 f"{vision.projection_dim} to share the embedding space")
        self.vision = CLIPVisionModel(vision)
        self.texts = nn.ModuleList(CLIPTextModel(t) for t in texts)
        self.logit_scale = nn.Parameter(torch.full((len(texts),), float(torch.log(torch.tensor(1 / 0.07)))))

    def forward(self, pixels: Tensor, ids: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Normalised pixels (B, 3, S, S) and token ids per tower (B, 77) -> image (B, P), texts [(B, P)]."""
        img = self.vision(pixels)
        return img, [tower(t, pooled=True).pooled for tower, t in zip(self.texts, ids)]

    def configs(self) -> dict:
        import dataclasses

        return {"vision": dataclasses.asdict(self.vision.config), "texts": [dataclasses.asdict(t.config) for t in self.texts]}

    @staticmethod
    def from_configs(d: dict) -> CLIPModel:
        return CLIPModel(component_from_dict(CLIPVisionConfig, d["vision"]),
                         [component_from_dict(CLIPTextConfig, t) for t in d["texts"]])
