"""A small highway net really trained with a gate penalty: pruned ONNX vs the same net masked in PyTorch.

`tests/data/small_gated.pt` is made by `python tests/data/make_small_gated.py` (8 epochs on 10,000
CIFAR-10 images, λ = 3, uniform weighting, μ = 0.3). The masked reference zeroes exactly the gates
that pruning removes, so the two differ only by what the surgery and refit change.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

CHECKPOINT = Path(__file__).parent / "data" / "small_gated.pt"
THRESHOLD = 0.05


@pytest.fixture(scope="module")
def small(tmp_path_factory, cifar_path):
    if not CHECKPOINT.is_file():
        pytest.fail(f"{CHECKPOINT} is missing; make it with tests/data/make_small_gated.py")
    import torch

    from hwtool.export import export_checkpoint
    from hwtool.train import build_model, load_checkpoint

    ckpt = load_checkpoint(CHECKPOINT)
    out = tmp_path_factory.mktemp("small") / "small.onnx"
    export_checkpoint(CHECKPOINT, out, exporter="torchscript", data=cifar_path, gate_images=512)
    torch.manual_seed(0)
    return build_model(ckpt), out


def _torch_accuracy(model, x, y, masks=None) -> float:
    import torch

    with torch.no_grad():
        logits = torch.cat([model(torch.from_numpy(x[i : i + 500]), masks=masks) for i in range(0, len(x), 500)])
    return float((logits.argmax(1).numpy() == y).mean())


def test_pruned_accuracy_tracks_the_masked_model(small, cifar):
    import onnx
    import torch

    from hwtool.evaluate import accuracy_onnx
    from hwtool.gates import gates_from_metadata
    from hwtool.patterns import find_blocks
    from hwtool.prune import PruneConfig, prune

    model, path = small
    proto = onnx.load(str(path))
    stats = gates_from_metadata(proto, find_blocks(proto))
    removed = stats.fraction_below(THRESHOLD)
    assert removed > 0.3, f"the penalty should have pushed many gates under {THRESHOLD}, got {removed:.0%}"

    test = cifar["test"].head(2000)
    x, y = test.as_float(), test.labels
    masks = [torch.from_numpy((m >= THRESHOLD).astype(np.float32)) for m in stats.means]
    full = _torch_accuracy(model, x, y)
    masked = _torch_accuracy(model, x, y, masks)

    calib = cifar["train"].as_float(256)
    refit, rep = prune(proto, THRESHOLD, calib=calib, gate_stats=stats)
    plain, _ = prune(proto, THRESHOLD, calib=calib, gate_stats=stats, config=PruneConfig(refit=False))
    acc_refit = accuracy_onnx(refit, test)[0] / len(test)
    acc_plain = accuracy_onnx(plain, test)[0] / len(test)

    assert rep.params_after < 0.8 * rep.params_before
    # The refit keeps the pruned network within 2 points of the masked one...
    assert acc_refit >= masked - 0.02, (full, masked, acc_refit, acc_plain)
    # ... and does at least as well as the paper's plain drop of the removed gate inputs.
    assert acc_refit >= acc_plain - 0.005, (full, masked, acc_refit, acc_plain)
