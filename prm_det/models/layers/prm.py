"""PRM as an MMDetection module (the math is in :mod:`prm_det.ops.prm`).

Ma & Fu, "Position-Aware Recalibration Module: Learning From Feature Semantics
and Feature Position", IJCAI 2020. https://www.ijcai.org/proceedings/2020/111
"""
import torch
import torch.nn as nn
from mmdet.registry import MODELS
from torch import Tensor

from prm_det.ops.prm import (MODES, NORM_EPS, batchnorm_prm_eval,
                             batchnorm_prm_residual, prm)


@MODELS.register_module()
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
        self.groups = groups
        self.mode = mode
        self.use_position = use_position
        self.use_norm = use_norm
        self.normalized_positions = normalized_positions
        self.reference = reference
        self.weight = nn.Parameter(torch.zeros(1, groups, 1, 1))  # lambda
        self.bias = nn.Parameter(torch.ones(1, groups, 1, 1))  # xi
        self.one = nn.Parameter(torch.ones(1, groups, 1))  # beta
        self.zero = nn.Parameter(torch.zeros(1, groups, 1))  # alpha
        self.theta = nn.Parameter(torch.rand(1, 2, 1, 1))  # (row, col)
        self.scale = nn.Parameter(torch.ones(1))  # sigma

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f'PRM expects [b, {self.in_channels}, h, w] inputs, got '
                f'{tuple(x.shape)}')

    def _params(self) -> tuple:
        """The six parameters in the ops' order, read from
        ``_parameters`` directly (nn.Module's attribute lookup is a Python
        call per name, which a block's forward pays on every call)."""
        p = self._parameters
        return (p['weight'], p['bias'], p['one'], p['zero'], p['theta'],
                p['scale'])

    def _options(self) -> tuple:
        return (self.groups, self.use_position, self.use_norm,
                self.normalized_positions, NORM_EPS)

    def _parameters_and_options(self) -> tuple:
        """Everything the ops after the input take, in their order."""
        return self._params() + self._options()

    def _prm(self, x: Tensor, **kwargs) -> Tensor:
        self._check_input(x)
        (weight, bias, one, zero, theta, scale, groups, use_position,
         use_norm, normalized_positions, eps) = self._parameters_and_options()
        return prm(x, weight, bias, one, zero, theta, scale, groups,
                   self.mode, use_position, use_norm, normalized_positions,
                   eps, self.reference, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        return self._prm(x)

    def forward_residual(self, x: Tensor, identity: Tensor) -> Tensor:
        """``relu(self(x) + identity)``: a residual block's output, with the
        shortcut add and the ReLU done in PRM's gating pass."""
        if identity.shape != x.shape:
            raise ValueError(
                f'PRM.forward_residual: identity {tuple(identity.shape)} '
                f'does not match x {tuple(x.shape)}')
        return self._prm(x, identity=identity, relu=True)

    def forward_norm_residual(self, c: Tensor, norm: nn.Module,
                              identity: Tensor,
                              reuse_c: bool = False) -> Tensor:
        """``relu(self(norm(c)) + identity)`` from the last convolution's
        output ``c``. With a BatchNorm2d ``norm`` on the fast path, the
        normalized map is recomputed in backward instead of being kept, so a
        PRM block keeps what a plain block keeps (plus PRM's small state).
        ``reuse_c``: nothing else holds ``c``, so inference may write the
        result over it (see :func:`batchnorm_prm_residual`).
        """
        if (type(norm) is nn.BatchNorm2d and self.mode == 'dotproduct'
                and not self.reference):
            if not torch.is_grad_enabled() and c.dim() == 4 and \
                    c.shape[1] == self.in_channels:
                # inference: the CPU kernel straight away where it applies
                y = batchnorm_prm_eval(c, norm, identity, self._params(),
                                       self._options(), reuse_c)
                if y is not None:
                    return y
            if (c.dtype in (torch.float32, torch.float64)
                    and not torch.is_autocast_enabled(c.device.type)
                    and identity.shape == c.shape):
                self._check_input(c)
                return batchnorm_prm_residual(
                    c, norm, identity, *self._parameters_and_options(),
                    reuse_c=reuse_c)
        return self.forward_residual(norm(c), identity)

    def extra_repr(self) -> str:
        return (f'{self.in_channels}, groups={self.groups}, mode={self.mode!r}'
                f', use_position={self.use_position}, use_norm='
                f'{self.use_norm}, normalized_positions='
                f'{self.normalized_positions}')
