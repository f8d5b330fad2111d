"""Architecture presets: real releases' geometry with random weights, for profiling before the weights exist."""
import pytest

from vlmc import api
from vlmc.errors import VlmcError
from vlmc.models_zoo import describe, load, presets

TINY = {
    "release": "a tiny SmolVLM-shaped test preset",
    "config": presets._smolvlm(presets._llama(64, 128, 2, 4, 2, 64, head_dim=16, bos=1, eos=2)),
    "preprocessor": {"size": {"longest_edge": 64}, "max_image_size": {"longest_edge": 32}, "resample": 1},
    "specials": {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": 3, "<fake_token_around_image>": 4, "<global-img>": 5,
                 "<end_of_utterance>": 6, "<|im_start|>": 7},
    "bos": True,
}
TINY["config"]["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       image_size=32, patch_size=4)
TINY["config"].update(image_token_id=3, scale_factor=2)


@pytest.fixture
def tiny_preset(monkeypatch, tmp_path):
    monkeypatch.setenv("VLMC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(presets.PRESETS, "tiny-smolvlm", TINY)
    return "preset:tiny-smolvlm"


def test_models_lists_the_presets():
    rows = {r["name"]: r for r in describe()}
    assert rows["preset:smolvlm2-256m"]["kind"] == "preset (random weights)"
    assert "preset:llava-1.5-7b" in rows


def test_smolvlm2_256m_preset_has_the_release_geometry(monkeypatch, tmp_path):
    monkeypatch.setenv("VLMC_CACHE", str(tmp_path))
    loaded = load("preset:smolvlm2-256m")
    m = loaded.model
    params = sum(p.numel() for p in m.parameters())
    assert loaded.random_weights and m.family == "smolvlm"
    assert m.num_image_tokens == 64 and m.image_size == 512
    assert 250e6 < params < 260e6, params  # SmolVLM2-256M: 93M SigLIP-B/16 + 162M SmolLM2-135M (untied head)
    assert loaded.tokenizer.vocab_size == 49280 and loaded.tokenizer.token_id("<image>") == 49190


def test_a_preset_bundle_says_its_weights_are_random_and_eval_refuses_it(tiny_preset, tmp_path):
    b = api.compile({"model": tiny_preset, "targets": ["onnx"], "max_context": 48}, tmp_path / "b")
    assert b.manifest["model"]["weights"].startswith("random")
    assert all(r["passed"] for r in b.manifest["verification"]["results"])
    with pytest.raises(VlmcError, match="random weights"):
        api.evaluate(b.path, "onnxruntime", n=4)
    with pytest.raises(VlmcError, match="random weights"):
        api.evaluate(tiny_preset, "eager", n=4)


def test_an_unknown_preset_is_named(tmp_path):
    with pytest.raises(VlmcError, match="unknown preset 'nope'"):
        load("preset:nope")


# (parameters in millions, image tokens, image size) of each release, checked without allocating weights
RELEASES = {"smolvlm2-256m": (256.5, 64, 512), "smolvlm2-500m": (507.5, 64, 512), "internvl3-1b": (802.3, 256, 448),
            "qwen2.5-vl-3b": (3754.6, 256, 448), "qwen3-vl-2b": (2127.5, 196, 448), "lfm2-vl-450m": (450.8, 256, 512), "gemma3-4b": (4300.1, 256, 896), "llava-1.5-7b": (7063.4, 576, 336)}


@pytest.mark.parametrize("name", list(RELEASES))
def test_every_preset_builds_with_its_release_geometry(monkeypatch, tmp_path, name):
    import torch

    from vlmc.models_zoo import adapter

    monkeypatch.setenv("VLMC_CACHE", str(tmp_path))
    p = presets.PRESETS[name]
    directory = presets.materialize(name)
    with torch.device("meta"):  # the geometry only: no memory for the weights
        m = adapter(p["config"]["model_type"]).build(p["config"], directory, p["preprocessor"])
    params, tokens, size = RELEASES[name]
    assert round(sum(x.numel() for x in m.parameters()) / 1e6, 1) == params
    assert (m.num_image_tokens, m.image_size) == (tokens, size)
    assert (directory / "tokenizer.json").stat().st_size > 0
