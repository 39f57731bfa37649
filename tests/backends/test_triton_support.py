"""The PDL launch rule of the torch backend's Triton kernels (backends/torch/triton_support.py)."""

import pytest
import torch

from backends.torch import triton_support


def test_pdl_launch_only_on_cuda_hopper_and_not_when_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_support, "_TRITON_HAS_PDL", True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert triton_support.pdl_launch(torch.zeros(1)) == {}  # a CPU tensor: an ordinary launch
    if torch.cuda.is_available():
        x = torch.zeros(1, device="cuda")
        expected = {"USE_PDL": True, "launch_pdl": True} if torch.cuda.get_device_capability() >= (9, 0) else {}
        assert triton_support.pdl_launch(x) == expected
        monkeypatch.setenv("MOEC_PDL", "0")
        assert triton_support.pdl_launch(x) == {}
        monkeypatch.setenv("MOEC_PDL", "1")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert triton_support.pdl_launch(x) == {}
        monkeypatch.setattr(triton_support, "_TRITON_HAS_PDL", False)
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert triton_support.pdl_launch(x) == {}
