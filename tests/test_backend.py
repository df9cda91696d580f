"""Backend switch and the missing-extension error."""
import pytest
import torch

import dsig_ext
from dsig_ext import _extension


def test_set_backend_validates():
    with pytest.raises(ValueError, match="backend must be one of"):
        dsig_ext.set_backend("triton")
    dsig_ext.set_backend("reference")
    assert dsig_ext.get_backend() == "reference"
    with dsig_ext.use_backend("fused"):
        assert dsig_ext.get_backend() == "fused"
    assert dsig_ext.get_backend() == "reference"


def test_missing_extension_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_extension, "_LOAD_ERROR", ImportError("no _C"))
    xs = torch.randn(4, 3)
    offsets = torch.tensor([0, 4])
    with pytest.raises(RuntimeError, match=r"pip install --no-build-isolation -e \."):
        dsig_ext.edge_mse_loss(xs, xs, offsets, backend="fused")
    # the reference backend keeps working
    assert dsig_ext.edge_mse_loss(xs, xs, offsets, backend="reference").item() == 0.0
    pooler = dsig_ext.MultiLevelRoIAlign(7, [0.25], 0, backend="reference")
    out = pooler([torch.randn(1, 2, 8, 8)], [torch.tensor([[0.0, 0.0, 10.0, 12.0]])])
    assert out.shape == (1, 2, 7, 7)


def test_extension_loaded_here():
    assert dsig_ext.extension_available()
