"""The tiny autoencoder (TAESD / TAESDXL): parity with diffusers' AutoencoderTiny (random weights, the default
= TAESD/TAESDXL config), and loading from diffusers folders, upstream's bare files and our own files."""

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from stablexl.config import TAESD_MINI, TAESDXL
from stablexl.io.checkpoint import CheckpointError
from stablexl.io.tiny import load_tiny_autoencoder, save_tiny_autoencoder, tiny_from_diffusers
from stablexl.models.taesd import AutoencoderTiny, decode_tiny

diffusers = pytest.importorskip("diffusers")


def _reference(seed: int = 0):
    """diffusers' AutoencoderTiny with its default (TAESD) config and random, non-trivial weights."""
    torch.manual_seed(seed)
    ref = diffusers.AutoencoderTiny().eval()
    with torch.no_grad():
        for p in ref.parameters():  # default init leaves ReLU nets near zero output; widen it
            p.mul_(1.5)
    return ref


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def ref():
    return _reference()


def _ours_from(ref) -> AutoencoderTiny:
    ours = AutoencoderTiny(dataclasses.replace(TAESDXL)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # same key names, nothing renamed
    return ours


def test_decode_and_encode_match_diffusers(ref):
    ours = _ours_from(ref)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 4, 8, 12, generator=g) * 2  # beyond ±3 as well: exercises the soft clamp
    x = torch.rand(2, 3, 64, 96, generator=g) * 2 - 1
    with torch.no_grad():
        want_img = ref.decode(z).sample
        want_lat = ref.encode(x).latents
        got_img, got_lat = ours.decode(z), ours.encode(x)
    assert got_img.shape == (2, 3, 64, 96) and got_lat.shape == (2, 4, 8, 12)
    assert want_img.std() > 0.05 and want_lat.std() > 0.05  # not a trivially small signal
    assert _rel(got_img, want_img) < 1e-4
    assert _rel(got_lat, want_lat) < 1e-4


def test_config_matches_upstream_size(ref):
    ours = AutoencoderTiny(TAESDXL)
    assert sum(p.numel() for p in ours.decoder.parameters()) == sum(p.numel() for p in ref.decoder.parameters())
    assert tiny_from_diffusers(dict(ref.config), "ref") == dataclasses.replace(TAESDXL, latent_space=None)


def test_loads_diffusers_folder(ref, tmp_path):
    ref.save_pretrained(tmp_path / "taesdxl")
    ours = load_tiny_autoencoder(tmp_path / "taesdxl", latent_space="sdxl")
    assert ours.config.latent_space == "sdxl"
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert _rel(ours.decode(z), ref.decode(z).sample) < 1e-4


def _upstream_files(ref, folder):
    """Write upstream's layout: bare nn.Sequential indices, the decoder's shifted by its leading clamp."""
    sd = ref.state_dict()
    dec = {f"{int(k.split('.')[2]) + 1}.{k.split('.', 3)[3]}": v for k, v in sd.items() if k.startswith("decoder.")}
    enc = {k.split(".", 2)[2]: v for k, v in sd.items() if k.startswith("encoder.")}
    save_file({k: v.contiguous() for k, v in dec.items()}, folder / "taesdxl_decoder.safetensors")
    save_file({k: v.contiguous() for k, v in enc.items()}, folder / "taesdxl_encoder.safetensors")
    return dec, enc


def test_loads_upstream_decoder_and_encoder_files(ref, tmp_path):
    dec, enc = _upstream_files(ref, tmp_path)
    assert "1.weight" in dec and "3.conv.0.weight" in dec and "0.weight" in enc  # the layout users have
    d = load_tiny_autoencoder(tmp_path / "taesdxl_decoder.safetensors")
    e = load_tiny_autoencoder(tmp_path / "taesdxl_encoder.safetensors")
    assert d.encoder is None and e.decoder is None
    assert d.config.latent_space is None  # a bare file does not say; taesd and taesdxl files look the same
    z, x = torch.randn(1, 4, 8, 8), torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert _rel(d.decode(z), ref.decode(z).sample) < 1e-4
        assert _rel(e.encode(x), ref.encode(x).latents) < 1e-4
    with pytest.raises(RuntimeError, match="without its encoder"):
        d.encode(x)


def test_refuses_pickles_and_lists_wrong_shapes(ref, tmp_path):
    torch.save({"1.weight": torch.zeros(64, 4, 3, 3)}, tmp_path / "taesd_decoder.pth")
    with pytest.raises(CheckpointError, match="refusing to load a pickled"):
        load_tiny_autoencoder(tmp_path / "taesd_decoder.pth")
    mini = AutoencoderTiny(TAESD_MINI, encoder=False)  # narrower levels: not TAESD's shapes
    save_file({f"{int(k.split('.')[2]) + 1}.{k.split('.', 3)[3]}": v.contiguous() for k, v in mini.state_dict().items()},
              tmp_path / "odd_decoder.safetensors")
    with pytest.raises(CheckpointError, match=r"file \[32, 64, 3, 3\], model \[64, 64, 3, 3\]"):
        load_tiny_autoencoder(tmp_path / "odd_decoder.safetensors")
    save_file({"model.weight": torch.zeros(2, 2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="not a tiny autoencoder"):
        load_tiny_autoencoder(tmp_path / "other.safetensors")


def test_own_file_round_trip_and_latent_space_check(tmp_path):
    torch.manual_seed(0)
    mini = AutoencoderTiny(TAESD_MINI, encoder=False).eval()
    path = save_tiny_autoencoder(mini, tmp_path / "tiny.safetensors", dtype=torch.float16)
    back = load_tiny_autoencoder(path, dtype=torch.float32)
    assert back.config == TAESD_MINI and back.encoder is None
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert _rel(back.decode(z), mini.decode(z)) < 1e-2  # fp16 storage
    with pytest.raises(CheckpointError, match="'mini' latent space, but 'sdxl'"):
        load_tiny_autoencoder(path, latent_space="sdxl")


def test_mini_size_and_decode_result():
    mini = AutoencoderTiny(TAESD_MINI, encoder=False)
    assert 2 * sum(p.numel() for p in mini.parameters()) < 2_000_000  # ≤ 2 MB in fp16
    res = decode_tiny(mini.half(), torch.randn(1, 4, 8, 8))
    assert res.images.dtype == torch.float32 and res.images.shape == (1, 3, 64, 64)


def test_pack_unpack_latents():
    m = AutoencoderTiny(TAESDXL, encoder=False)
    z = torch.linspace(-2.9, 2.9, 64).reshape(1, 4, 4, 4)
    assert (m.unpack_latents(m.pack_latents(z)) - z).abs().max() <= 3 / 255 + 1e-6


def test_hub_names_resolve_in_the_local_cache(ref, tmp_path, monkeypatch):
    snap = tmp_path / "hub" / "models--madebyollin--taesdxl" / "snapshots" / "abc"
    ref.save_pretrained(snap)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert load_tiny_autoencoder("taesdxl").config.latent_space == "sdxl"  # the name says which VAE it mimics
    with pytest.raises(CheckpointError, match="'sdxl' latent space, but 'sd'"):
        load_tiny_autoencoder("taesdxl", latent_space="sd")
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        load_tiny_autoencoder("taesd")
