"""The fused block tail for the gate attentions (SE, GE, GC, SGE, CBAM).

A gate module with a ``gate_tail(nmap, identity)`` method (its small layers
between :func:`prm_det.ops.gate_tail.normalize` and
:meth:`~prm_det.ops.gate_tail.NormalizedMap.finish`) gets
``forward_norm_residual`` from :class:`FusedGateTail`: the residual block's
``relu(module(norm(c)) + identity)`` in the passes of
:mod:`prm_det.ops.gate_tail` where the norm is a BatchNorm2d and a backend
takes the map; the modules one after another otherwise (SyncBN or another
norm, exporting, the 'reference' backend, an empty batch).
"""
import torch
from torch import Tensor, nn

from prm_det.ops.gate_tail import NormalizedMap, normalize, tail_backend

from .prm import batch_norm_of


class FusedGateTail:
    """Mixin: ``forward_norm_residual`` through the gate tail ops; the
    class defines ``gate_tail(nmap, identity) -> Tensor``."""

    def gate_tail(self, nmap: NormalizedMap, identity: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_norm_residual(self, c: Tensor, norm: nn.Module,
                              identity: Tensor,
                              reuse_c: bool = False) -> Tensor:
        """``relu(self(norm(c)) + identity)`` from the last convolution's
        output (``reuse_c`` is PRM's in-place option: unused here)."""
        backend = tail_backend(c, identity)
        bn = None if backend is None else batch_norm_of(norm, c)
        if bn is None:
            return torch.relu(self(norm(c)) + identity)
        return self.gate_tail(normalize(c, bn, backend), identity)
