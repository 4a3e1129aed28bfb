"""Shared fixtures: the real CIFAR-10 tarball and one tiny network, trained once and exported twice.

`tiny_checkpoint` is a real 1-epoch training run on 512 real images (widths 8,16,32, depth 1);
`tiny_onnx_dynamo` and `tiny_onnx_torchscript` are its exports by each torch exporter. Every test
that needs a trained highway network (train, export, eval, prune) reuses these, so the suite trains
once per session.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# The tarball lies beside the repository on these machines; HWTOOL_CIFAR10 points elsewhere.
CIFAR10 = Path(
    os.environ.get("HWTOOL_CIFAR10", Path(__file__).resolve().parents[1] / ".." / "shared/data/cifar10-jpeg.tar.gz")
)
TINY_OPTIONS = ["--epochs", "1", "--limit", "512", "--widths", "8,16,32", "--depth", "1"]
TINY_WIDTHS = (8, 16, 32)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny networks on a shared 2-core machine: one intra-op thread, unless OMP_NUM_THREADS says otherwise.

    Measured: a 1-epoch tiny run takes 4.5 s with one thread and 10 s with two when another job
    holds the cores, because OpenMP's two threads wait on each other.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        yield
        return
    import torch

    before = torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = "1"  # for the subprocesses (python -m hwtool, torchrun) too
    torch.set_num_threads(1)
    try:
        yield
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)
        torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def hwtool_cache():
    """Decoded-array cache for the session: $HWTOOL_CACHE when set, else a folder removed at the end."""
    if os.environ.get("HWTOOL_CACHE"):
        yield Path(os.environ["HWTOOL_CACHE"])
        return
    tmp = tempfile.mkdtemp(prefix="hwtool-cache-")
    os.environ["HWTOOL_CACHE"] = tmp  # subprocesses (torchrun, python -m hwtool) inherit it
    try:
        yield Path(tmp)
    finally:
        os.environ.pop("HWTOOL_CACHE", None)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def cifar_path(hwtool_cache) -> str:
    """Path of the CIFAR-10 JPEG tarball, its arrays decoded into the cache once per session."""
    if not CIFAR10.is_file():
        pytest.skip(f"CIFAR-10 tarball not found at {CIFAR10} (set HWTOOL_CIFAR10 to its path)")
    from hwtool.data import load_cifar10

    load_cifar10(CIFAR10)  # decode once (about 10 s cold); later loads, also in subprocesses, hit the cache
    return str(CIFAR10.resolve())


@pytest.fixture(scope="session")
def cifar(cifar_path):
    """The loaded splits {'train': Split, 'test': Split}."""
    from hwtool.data import load_cifar10

    return load_cifar10(cifar_path)


@pytest.fixture(scope="session")
def tiny_checkpoint(cifar_path, tmp_path_factory) -> Path:
    """checkpoint.pt of a 1-epoch run on the first 512 images (bf16 autocast, widths 8,16,32, depth 1)."""
    from rich.console import Console

    from hwtool.train import CHECKPOINT, config_from_options, train

    out = tmp_path_factory.mktemp("tiny-run")
    cfg = config_from_options(epochs=1, limit=512, widths=TINY_WIDTHS, depth=1)
    train(cfg, cifar_path, out, console=Console(quiet=True))
    return out / CHECKPOINT


def _export(checkpoint: Path, exporter: str) -> Path:
    import warnings

    from hwtool.export import export_checkpoint

    out = checkpoint.parent / f"tiny-{exporter}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation chatter, not our concern here
        export_checkpoint(checkpoint, out, exporter=exporter)
    return out


@pytest.fixture(scope="session")
def tiny_onnx_dynamo(tiny_checkpoint) -> Path:
    """The tiny checkpoint exported with torch.onnx's dynamo exporter."""
    return _export(tiny_checkpoint, "dynamo")


@pytest.fixture(scope="session")
def tiny_onnx_torchscript(tiny_checkpoint) -> Path:
    """The tiny checkpoint exported with torch.onnx's TorchScript exporter."""
    return _export(tiny_checkpoint, "torchscript")
