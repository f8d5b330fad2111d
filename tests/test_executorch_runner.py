"""ExecuTorch's stock MultimodalRunner (the runner of its Android / iOS apps) runs a vlmc bundle unchanged."""
import numpy as np
import torch

from vlmc import api
from vlmc.runtimes.image import load_image


def test_stock_multimodal_runner_generates_vlmc_tokens(tiny_bundle, sample_image):
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (the llama:: kernels)
    from executorch.extension.llm.runner import GenerationConfig, MultimodalRunner, make_image_input, make_text_input

    ours = api.run(tiny_bundle.path, "executorch", sample_image, "what color is the circle ?", max_new_tokens=8)
    runner = MultimodalRunner(str(tiny_bundle.path / "model.pte"), str(tiny_bundle.path / "tokenizer.json"))
    image = torch.from_numpy(np.ascontiguousarray(load_image(sample_image, 32)))
    pieces = []
    runner.generate([make_text_input("USER : "), make_image_input(image), make_text_input(" what color is the circle ? ASSISTANT :")],
                    GenerationConfig(max_new_tokens=8, temperature=0.0, echo=False), token_callback=pieces.append)
    generated = [p for p in pieces if p and p != "</s>"]
    assert generated == ours["pieces"], (generated, ours["pieces"])
