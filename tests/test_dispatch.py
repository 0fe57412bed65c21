import pytest
import torch

from r2d2.kernels import BackendUnavailable, KernelConfig, dispatch
from r2d2.kernels import attention, contrastive_loss


def test_auto_on_cpu_is_runnable():
    for op, row in dispatch.describe("cpu").items():
        assert row[row["auto"]] == "ok", (op, row)


def test_cuda_backend_on_cpu_tensor_names_why():
    q = torch.randn(1, 1, 3, 8)
    with pytest.raises(BackendUnavailable, match="attention"):
        attention(q, q, q, backend="xformers")


def test_unknown_backend():
    f = torch.randn(2, 4)
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        contrastive_loss(f, f, torch.tensor(10.0), backend="nope")


def test_kernel_config_validates():
    with pytest.raises(ValueError, match="kernels.attention"):
        KernelConfig(attention="fast")
