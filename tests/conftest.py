"""Shared fixtures: tiny models built locally once per session (no download)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from converters.tiny_model import build_tiny_model
from easyquant_vllm.kernels import LayerSpec
from easyquant_vllm.quant import QuantizedWeight, QuantSpec, quantize_group


@pytest.fixture(autouse=True)
def _seeded_global_rng() -> None:
    """Every test starts from the same state of torch's global RNG (tests that draw without a generator of their own),
    so a failure comes back when the test is run again, alone or in the suite."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama (hidden 256, 8 heads / 2 KV heads), single safetensors file."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def tiny_llama_sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model saved as several shards with a model.safetensors.index.json."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama-sharded", max_shard_size="1MB")


def heavy_tailed(n: int, k: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[n, k]`` weight shaped like a trained one: Student-t noise, per-row scales, std ~0.02."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, k, generator=g) / (torch.randn(n, k, 5, generator=g).square().mean(-1)).sqrt()
    return (t * torch.exp(0.3 * torch.randn(n, 1, generator=g)) * 0.015).to(dtype)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` skip cleanly where there is no CUDA device (our machines and CI)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


FORMAT_VERSIONS = (1, 2, 3)
"""Every format version the kernels serve: unit tests of a kernel run each (``@pytest.mark.parametrize``)."""


def quantized(w: torch.Tensor, version: int, group_size: int, **overrides: object) -> QuantizedWeight:
    """``w`` quantized with format ``version``'s defaults (its column scale included, as the converter makes it)."""
    return quantize_group([w], QuantSpec.for_version(version, group_size=group_size, **overrides))[0]


def layer_spec(qw: QuantizedWeight, dtype: torch.dtype, device_type: str = "cpu") -> LayerSpec:
    """The :class:`LayerSpec` a kernel is given for ``qw`` (the tensors of its format version announced)."""
    return LayerSpec.of(qw, dtype, device_type)
