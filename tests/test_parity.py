"""vlmc's LLaVA implementation against transformers' on the same checkpoint directory."""
import torch
import pytest

from tests.helpers import make_hf_llava
from vlmc.models_zoo import load


@pytest.mark.parametrize("tie,layer", [(False, -2), (True, -1)])
def test_logits_match_transformers(tmp_path, tie, layer):
    hf = make_hf_llava(tmp_path, tie=tie, feature_layer=layer)
    ours = load(str(tmp_path)).model
    ids = torch.tensor([[1, 17, 18, 19] + [4] * 16 + [20, 21, 6]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels).logits
        got = ours(ids, pixels)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4


def test_cached_decoding_matches_transformers(tmp_path):
    hf = make_hf_llava(tmp_path)
    ours = load(str(tmp_path)).model
    ids = torch.tensor([[1, 17, 18] + [4] * 16 + [20, 21]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = hf(input_ids=ids, pixel_values=pixels, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        hf_step = hf(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True).logits[:, -1]

        embeds = ours.merge_embeddings(ids, ours.encode_image(pixels))
        n = embeds.shape[1]
        logits, past = ours.decode(embeds, torch.arange(n)[None], None)
        assert (logits - out.logits).abs().max().item() <= 1e-4
        step, _ = ours.decode(ours.language_model.embed_tokens(nxt), torch.tensor([[n]]), past)
    assert (step[:, -1] - hf_step).abs().max().item() <= 1e-4


def test_builtin_checkpoint_loads_in_transformers_with_the_same_answers():
    from transformers import LlavaForConditionalGeneration

    from vlmc.eval import shapes_vqa
    from vlmc.models_zoo import BUILTIN_ROOT

    loaded = load("shapes-llava")
    hf = LlavaForConditionalGeneration.from_pretrained(BUILTIN_ROOT / "shapes-llava").eval()
    c = loaded.config
    for item in shapes_vqa.items("test", 4):
        prompt = loaded.tokenizer.prompt("USER: <image>\n{prompt} ASSISTANT:", item.question, c.num_image_tokens, c.image_token_id, None)
        ids = torch.tensor([prompt.ids])
        pixels = loaded.model.normalize(torch.from_numpy(item.image.transpose(2, 0, 1).copy()))
        with torch.no_grad():
            ours = loaded.model(ids, pixels)[0, -1]
            theirs = hf(input_ids=ids, pixel_values=pixels).logits[0, -1]
        assert (ours - theirs).abs().max().item() <= 1e-4
        assert int(ours.argmax()) == int(theirs.argmax())


@pytest.mark.parametrize("height,width", [(50, 90), (90, 50), (112, 112), (37, 41)])
def test_builtin_directory_builds_the_transformers_processor(tmp_path, height, width):
    """AutoProcessor loads the shipped directory; its pixels and ids are what vlmc feeds the programs."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    from vlmc.models_zoo import BUILTIN_ROOT
    from vlmc.recipe import build
    from vlmc.runtimes.image import load_image

    processor = AutoProcessor.from_pretrained(BUILTIN_ROOT / "shapes-llava")
    loaded = load("shapes-llava")
    Image.fromarray(np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(tmp_path / "i.png")
    template = loaded.template(build({})).prompt_template
    with Image.open(tmp_path / "i.png") as im:
        ref = processor(text=template.replace("{prompt}", "what color is the circle?"), images=im, return_tensors="pt")
    pixels = loaded.model.normalize(torch.from_numpy(load_image(tmp_path / "i.png", 112)))
    prompt = loaded.tokenizer.prompt(template, "what color is the circle?", 196, loaded.config.image_token_id, loaded.bos_token_id)
    assert (pixels - ref["pixel_values"]).abs().max().item() <= 1e-6
    assert prompt.ids == ref["input_ids"][0].tolist()


@pytest.mark.parametrize("bos", [True, False])
def test_bos_rule_of_a_tokenizer_saved_by_transformers5(tmp_path, bos):
    """transformers 5 writes the BOS rule into tokenizer.json's post-processor only; vlmc follows it."""
    from tests.helpers import SPECIALS, WORDS, write_hf5_tokenizer

    make_hf_llava(tmp_path)
    hf_tok = write_hf5_tokenizer(tmp_path, SPECIALS, WORDS, 64, bos)
    loaded = load(str(tmp_path))
    prompt = loaded.tokenizer.prompt("USER : <image> {prompt} ASSISTANT :", "what color is the circle ?", 16, 4, loaded.bos_token_id)
    text = "USER : " + "<image>" * 16 + " what color is the circle ? ASSISTANT :"
    assert prompt.ids == hf_tok(text)["input_ids"]
    assert (prompt.ids[0] == hf_tok.bos_token_id) is bos
