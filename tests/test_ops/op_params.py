"""Random PRM parameters for the op tests (test_backends, test_library,
test_triton_launches)."""
import torch

from prm_det.ops import PRMParams


def params_for(groups, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return PRMParams(
        torch.randn(1, groups, 1, 1, generator=g, dtype=dtype),
        torch.randn(1, groups, 1, 1, generator=g, dtype=dtype),
        torch.randn(1, groups, 1, generator=g, dtype=dtype),
        torch.randn(1, groups, 1, generator=g, dtype=dtype),
        torch.rand(1, 2, 1, 1, generator=g, dtype=dtype) + 0.1,
        torch.rand(1, generator=g, dtype=dtype) + 0.5)
