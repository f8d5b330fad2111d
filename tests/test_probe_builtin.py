"""The diagnostic probe: a linear probe reads what the features carry, and nothing they do not."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from probe_builtin import linear_probe_accuracy  # noqa: E402


def test_linear_probe_reads_a_linearly_coded_class_and_not_noise():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (2000,), generator=g)
    features = torch.randn(2000, 16, generator=g)
    coded = features.clone()
    coded[:, :4] += 6 * torch.nn.functional.one_hot(labels, 4)
    assert linear_probe_accuracy(coded, labels) > 99
    assert linear_probe_accuracy(features, labels) < 40  # chance is 25%
