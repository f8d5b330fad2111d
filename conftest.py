"""Fixtures shared by tests/ and device_tests/: a tiny checkpoint built with transformers, and the bundles
exported from it once per session (exports dominate the run's time, so each is built once and reused)."""
from __future__ import annotations

import pytest

from tests.helpers import SPACED_TEMPLATE, make_hf_llava


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llava")
    make_hf_llava(path)
    return path


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_ckpt):
    """The tiny model on onnx, executorch and coreml (16 image tokens, 64-slot cache, 40-token prefill)."""
    from vlmc import api

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    return api.compile({"model": str(tiny_ckpt), "targets": ["onnx", "executorch", "coreml"], "max_context": 64,
                        "max_prompt": 40, "prompt_template": SPACED_TEMPLATE}, out)


@pytest.fixture(scope="session")
def pruned_every_target(tmp_path_factory, tiny_ckpt):
    """The tiny model with DivPrune (16 -> 8 image tokens, in the graph) on every target, TVM for the host
    and cross-built for aarch64: the token-pass conformance bundle, the TVM target's and the devices'."""
    from vlmc import api

    return api.compile({"model": str(tiny_ckpt), "targets": ["onnx", "executorch", "coreml", "tvm"], "max_context": 64,
                        "max_prompt": 40, "prompt_template": SPACED_TEMPLATE, "tvm": {"architectures": ["host", "aarch64"]},
                        "passes": [{"name": "divprune", "keep": 8}]}, tmp_path_factory.mktemp("bundles") / "divprune")
