"""PRM as an MMDetection module (the math is in :mod:`prm_det.ops`).

Ma & Fu, "Position-Aware Recalibration Module: Learning From Feature Semantics
and Feature Position", IJCAI 2020. https://www.ijcai.org/proceedings/2020/111
"""
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from prm_det.ops import (MODES, NORM_EPS, BatchNorm, PRMOptions, PRMParams,
                         prm, prm_block_tail)
from prm_det.ops.functions import check_batch_statistics

from ...private_apis import BATCH_NORM_BASE, module_tensors
from ..registry import register_model


def _plain_batch_norm(norm: nn.Module) -> bool:
    """Whether ``norm`` computes torch's BatchNorm on a 4-d map:
    ``nn.BatchNorm2d``, or a subclass of torch's batch norm base that keeps
    its forward and accepts any input rank (mmengine's SyncBN
    replacement)."""
    if isinstance(norm, nn.BatchNorm2d):
        return type(norm).forward is nn.BatchNorm2d.forward
    base = BATCH_NORM_BASE
    return (isinstance(norm, base) and type(norm).forward is base.forward
            and not isinstance(norm, (nn.BatchNorm1d, nn.BatchNorm3d,
                                      nn.SyncBatchNorm)))


def batch_norm_of(norm: nn.Module, c: Tensor) -> Optional[BatchNorm]:
    """An ``nn.BatchNorm2d`` about to normalize ``c`` as the op's
    :class:`BatchNorm` (tensors and settings), with the bookkeeping of
    torch's ``_BatchNorm.forward`` (``num_batches_tracked``, the momentum
    factor) once ``c`` is known to be acceptable; None for any other norm,
    which then runs as a module: SyncBN (its statistics come from every
    rank) and any norm with a forward of its own.

    The op takes ``nn.BatchNorm2d`` and the BatchNorm that mmengine puts in
    place of SyncBN where it cannot run (a run that is not distributed, or a
    distributed one on CPU: ``revert_sync_batchnorm``), whose forward is
    BatchNorm2d's without the input-rank check."""
    if not _plain_batch_norm(norm):
        return None
    parameters, buffers = module_tensors(norm)
    check_batch_statistics(
        c, norm.training or buffers['running_mean'] is None)
    factor = 0.0 if norm.momentum is None else norm.momentum
    tracked = buffers.get('num_batches_tracked')
    if norm.training and norm.track_running_stats and tracked is not None:
        tracked.add_(1)
        if norm.momentum is None:
            factor = 1.0 / float(tracked)
    running_mean, running_var = buffers['running_mean'], buffers['running_var']
    use_batch_stats = norm.training or running_mean is None
    keep_running = not norm.training or norm.track_running_stats
    return BatchNorm(parameters['weight'], parameters['bias'],
                     running_mean if keep_running else None,
                     running_var if keep_running else None, use_batch_stats,
                     factor, norm.eps)


@register_model
class PRM(nn.Module):
    """Position-aware Recalibration Module.

    Parameter names, shapes and initial values are the official code's, so
    its ImageNet checkpoints load without renaming: ``weight`` (lambda,
    zeros [1, g, 1, 1]), ``bias`` (xi, ones [1, g, 1, 1]), ``one`` (beta,
    ones [1, g, 1]), ``zero`` (alpha, zeros [1, g, 1]), ``theta``
    (uniform [0, 1) [1, 2, 1, 1]) and ``scale`` (sigma, one [1]). A fresh PRM
    therefore starts as the global-context-only branch with every gate at
    sigmoid(1).

    Args:
        in_channels (int): Channels of the input feature map.
        groups (int): Number of heads; each takes a contiguous block of
            ``in_channels // groups`` channels. Defaults to 64.
        mode (str): Similarity, 'dotproduct', 'cosine' or 'l1norm'.
            Defaults to 'dotproduct'.
        use_position (bool): Weight the similarity to the query by the
            Gaussian of the distance to its position. Defaults to True.
        use_norm (bool): Semantic normalization over positions before the
            affine and sigmoid. Defaults to True.
        normalized_positions (bool): Distances in [0, 1] (the slides) instead
            of feature-map pixels (the official code). Defaults to False.
        reference (bool): Use the straightforward implementation instead of
            the fast path (same results; for comparisons). Defaults to False.

    Example:
        >>> import torch
        >>> from prm_det.models.layers import PRM
        >>> layer = PRM(256, groups=64)
        >>> tuple(layer(torch.rand(2, 256, 7, 9)).shape)
        (2, 256, 7, 9)
    """

    _abbr_ = 'prm'

    def __init__(self,
                 in_channels: int,
                 groups: int = 64,
                 mode: str = 'dotproduct',
                 use_position: bool = True,
                 use_norm: bool = True,
                 normalized_positions: bool = False,
                 reference: bool = False) -> None:
        super().__init__()
        if not isinstance(groups, int) or groups < 1:
            raise ValueError(
                f'PRM: groups must be a positive int, got {groups!r}')
        if in_channels % groups != 0:
            raise ValueError(
                f'PRM: in_channels ({in_channels}) must be divisible by '
                f'groups ({groups}); pick groups among the divisors of '
                f'{in_channels}')
        if mode not in MODES:
            raise ValueError(
                f'PRM: mode must be one of {MODES}, got {mode!r}')
        self.in_channels = in_channels
        self.options = PRMOptions(
            groups=groups, use_position=use_position, use_norm=use_norm,
            normalized_positions=normalized_positions, eps=NORM_EPS,
            mode=mode, backend='reference' if reference else None)
        self.weight = nn.Parameter(torch.zeros(1, groups, 1, 1))  # lambda
        self.bias = nn.Parameter(torch.ones(1, groups, 1, 1))  # xi
        self.one = nn.Parameter(torch.ones(1, groups, 1))  # beta
        self.zero = nn.Parameter(torch.zeros(1, groups, 1))  # alpha
        self.theta = nn.Parameter(torch.rand(1, 2, 1, 1))  # (row, col)
        self.scale = nn.Parameter(torch.ones(1))  # sigma

    def _check_input(self, x: Tensor) -> None:
        if torch.jit.is_tracing():  # sizes are tensors there (see the op)
            return
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f'PRM expects [b, {self.in_channels}, h, w] inputs, got '
                f'{tuple(x.shape)}')

    def _params(self) -> PRMParams:
        """The six parameters, read from ``_parameters`` directly
        (nn.Module's attribute lookup is a Python call per name, which a
        block's forward pays on every call)."""
        p = self._parameters
        return PRMParams(p['weight'], p['bias'], p['one'], p['zero'],
                         p['theta'], p['scale'])

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return prm(x, self._params(), self.options)

    def forward_residual(self, x: Tensor, identity: Tensor) -> Tensor:
        """``relu(self(x) + identity)``: a residual block's output, with the
        shortcut add and the ReLU done in PRM's gating pass."""
        self._check_input(x)
        return prm_block_tail(x, self._params(), self.options,
                              identity=identity, relu=True)

    def forward_norm_residual(self, c: Tensor, norm: nn.Module,
                              identity: Tensor,
                              reuse_c: bool = False) -> Tensor:
        """``relu(self(norm(c)) + identity)`` from the last convolution's
        output ``c``. With a BatchNorm2d ``norm`` the op applies the norm
        itself (the normalized map is not kept for backward); anything else
        runs ``norm`` first. ``reuse_c``: nothing else holds ``c``, so
        inference may write the result over it.
        """
        bn = batch_norm_of(norm, c)
        if bn is None:
            return self.forward_residual(norm(c), identity)
        self._check_input(c)
        return prm_block_tail(c, self._params(), self.options,
                              identity=identity, norm=bn, relu=True,
                              inplace=reuse_c)

    # the settings, read from the options the op takes
    groups = property(lambda self: self.options.groups)
    mode = property(lambda self: self.options.mode)
    use_position = property(lambda self: self.options.use_position)
    use_norm = property(lambda self: self.options.use_norm)
    normalized_positions = property(
        lambda self: self.options.normalized_positions)
    reference = property(lambda self: self.options.backend == 'reference')

    def extra_repr(self) -> str:
        return (f'{self.in_channels}, groups={self.groups}, mode={self.mode!r}'
                f', use_position={self.use_position}, use_norm='
                f'{self.use_norm}, normalized_positions='
                f'{self.normalized_positions}')
