"""Every family's TVM libraries cross-compiled for aarch64, run under qemu-aarch64 on TVM's runtime alone (slow):
the first-token logits and greedy tokens of the host's libraries, uncompressed, with a token pass in the graph
and with int4 weights.

    python -m pytest -q -m slow device_tests/test_families_qemu.py
"""
import pytest

from tests.test_family_matrix import FAMILIES
from vlmc import api

pytestmark = pytest.mark.slow
PASSES = {"uncompressed": [], "divprune": [{"name": "divprune", "keep": 5}], "w4": [{"name": "w4", "group_size": 16}]}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_checkpoint(request, tmp_path_factory):
    build, extra, _ = FAMILIES[request.param]
    d = tmp_path_factory.mktemp(request.param)
    build(d)
    return d, extra


@pytest.mark.parametrize("passes", list(PASSES))
def test_aarch64_libraries_give_the_host_libraries_numbers(family_checkpoint, passes, qemu_sysroot, calibration_jsonl,
                                                          sample_image, tmp_path):
    d, extra = family_checkpoint
    b = api.compile({"model": str(d), "targets": ["tvm"], "max_context": 64, "passes": PASSES[passes],
                     "tvm": {"architectures": ["host", "aarch64"]}, "verify": {"quantized_rel_err": 0.5},
                     "calibration": {"dataset": str(calibration_jsonl), "n": 8}, **extra}, tmp_path / "b")
    result = api.compare(b.path, "tvm", sample_image, "what color is the circle ?", "qemu-aarch64")
    assert result["quantized"] == (passes == "w4")
    assert result["logits"]["passed"] and result["tokens"]["agree"], result
