"""`decoder="tiny"`: the request field, its check in resolve, and the pipeline's final decode with it."""

import numpy as np
import pytest
import torch

from stablexl.config import TAESDXL, preset
from stablexl.models.taesd import AutoencoderTiny, decode_tiny
from stablexl.pipeline import Pipeline
from stablexl.request import GenerationRequest, RequestError, resolve


@pytest.fixture(scope="module")
def pipe():
    base = Pipeline.from_pretrained("tiny-sdxl", device="cpu")
    assert base.tiny_decoder is None  # random presets ship none
    torch.manual_seed(0)
    return Pipeline(base.parts, name="tiny-sdxl", tiny_decoder=AutoencoderTiny(TAESDXL, encoder=False).eval())


def test_resolve_checks_the_decoder_field():
    cfg = preset("tiny-sdxl")
    assert resolve(GenerationRequest("a"), cfg).decoder == "full"
    assert resolve(GenerationRequest("a", decoder="tiny"), cfg, has_tiny_decoder=True).decoder == "tiny"
    with pytest.raises(RequestError, match="needs a tiny decoder") as e:
        resolve(GenerationRequest("a", decoder="tiny"), cfg)
    assert e.value.field == "decoder"
    with pytest.raises(RequestError, match="'full' or 'tiny'"):
        resolve(GenerationRequest("a", decoder="taesd"), cfg, has_tiny_decoder=True)


def test_tiny_decode_of_the_same_latents(pipe):
    kw = dict(steps=2, seed=3, width=64, height=64)
    full = pipe("a cat", **kw)
    tiny = pipe("a cat", decoder="tiny", **kw)
    assert torch.equal(full.latents, tiny.latents)  # only the decode differs
    want = decode_tiny(pipe.tiny_decoder, tiny.latents).images
    got = torch.from_numpy(np.asarray(tiny.images[0], dtype=np.float32))  # (64, 64, 3)
    ref = ((want[0].clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0)
    assert (got - ref).abs().max() <= 1
    assert any("tiny decoder" in n for n in tiny.notes) and tiny.request.decoder == "tiny"


def test_from_pretrained_tiny_decoder_option(tmp_path):
    from stablexl.io.tiny import save_tiny_autoencoder

    path = save_tiny_autoencoder(AutoencoderTiny(TAESDXL, encoder=False), tmp_path / "taesdxl_decoder.safetensors")
    p = Pipeline.from_pretrained("tiny-sdxl", device="cpu", tiny_decoder=path)
    assert isinstance(p.tiny_decoder, AutoencoderTiny)
    assert Pipeline.from_pretrained("tiny-sdxl", device="cpu", tiny_decoder="none").tiny_decoder is None


def test_mini_loads_its_shipped_tiny_decoder():
    from stablexl.io.checkpoint import CheckpointError
    from stablexl.io.tiny import mini_tiny_decoder_file, load_tiny_autoencoder

    assert mini_tiny_decoder_file().stat().st_size <= 2_000_000  # the 2 MB budget, fp16
    p = Pipeline.from_pretrained("mini", device="cpu")
    assert p.tiny_decoder is not None and p.tiny_decoder.config.latent_space == "mini"
    with pytest.raises(CheckpointError, match="'mini' latent space, but 'sdxl'"):  # not for another model's VAE
        load_tiny_autoencoder(mini_tiny_decoder_file(), latent_space="sdxl")
