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
