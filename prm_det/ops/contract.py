"""What the PRM op and its backends pass each other: named structures only.

The op (:mod:`prm_det.ops.functions`) is ``relu(prm(bn(c)) + identity)``
with the BatchNorm, the shortcut and the ReLU each optional: plain PRM is
``x * gate(x)``. Every backend (:mod:`prm_det.ops.backends`) implements

    forward(c, norm, identity, relu, params, options, inplace) -> Forward
    backward(grad_y, saved, needs) -> Gradients

and keeps the same state between them (:class:`PRMState`, small: nothing of
the feature map's size), which the op saves with ``save_for_backward``.
"""
from typing import NamedTuple, Optional, Tuple

from torch import Tensor

from .reference import NORM_EPS


class PRMOptions(NamedTuple):
    """PRM's settings (hashable: a layer builds it once).

    Args:
        groups (int): heads; each takes a contiguous block of channels.
        use_position (bool): weight the query similarity by the Gaussian
            position weight D. Defaults to True.
        use_norm (bool): semantic normalization of S over the positions.
            Defaults to True.
        normalized_positions (bool): distances in [0, 1] instead of pixels.
            Defaults to False.
        eps (float): added to the std in the normalization.
            Defaults to 1e-5 (official).
        mode (str): similarity, 'dotproduct' (every backend) or 'cosine' /
            'l1norm' (the reference only). Defaults to 'dotproduct'.
        backend (str | None): run this layer on one backend whatever the
            device ('reference' for the readable composition); None lets
            :func:`prm_det.ops.backends.select` choose. Defaults to None.
    """
    groups: int
    use_position: bool = True
    use_norm: bool = True
    normalized_positions: bool = False
    eps: float = NORM_EPS
    mode: str = 'dotproduct'
    backend: Optional[str] = None


class PRMParams(NamedTuple):
    """PRM's six parameters, official names and shapes: ``weight`` (lambda,
    [1, g, 1, 1]), ``bias`` (xi, [1, g, 1, 1]), ``one`` (beta, [1, g, 1]),
    ``zero`` (alpha, [1, g, 1]), ``theta`` ([1, 2, 1, 1], row and column),
    ``scale`` (sigma, [1])."""
    weight: Tensor
    bias: Tensor
    one: Tensor
    zero: Tensor
    theta: Tensor
    scale: Tensor


class BatchNorm(NamedTuple):
    """A ``BatchNorm2d`` as tensors and settings (the module unpacks itself
    into this; the op never touches the module).

    ``training`` means "normalize with the batch statistics" (the module in
    training, or one without running statistics); the running statistics,
    when given, are then updated in place with ``momentum`` as
    ``native_batch_norm`` does.
    """
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    training: bool
    momentum: float
    eps: float


def norm_tensors(norm: Optional[BatchNorm]) -> Tuple[Optional[Tensor], ...]:
    """BatchNorm's four tensors in the order every op takes them: weight,
    bias, running_mean, running_var (None each without a norm)."""
    if norm is None:
        return (None, ) * 4
    return norm.weight, norm.bias, norm.running_mean, norm.running_var


class PRMState(NamedTuple):
    """What forward keeps for backward, per (sample, group), n = b * groups:

    - ``query_index`` [n] int64: flat position of the query (first argmax of
      the group's channel sum);
    - ``query`` [n, cg] and ``context`` [n, cg]: the query vector q and the
      spatial mean z, in the backend's accumulation precision (float32 for
      half maps, otherwise at least the map's);
    - ``stats`` [n, 2]: mean and std of S over the positions (0 and 1
      without the normalization).

    Backward recomputes the gate and the similarities from these exactly
    as forward made them.
    """
    query_index: Tensor
    query: Tensor
    context: Tensor
    stats: Tensor


class Forward(NamedTuple):
    """A backend's forward: the output, BatchNorm's batch statistics (None
    without a norm or in eval; mean and 1/std per channel otherwise, as
    ``native_batch_norm`` returns them) and PRM's state (None when the
    result was written over ``c``: inference)."""
    y: Tensor
    save_mean: Optional[Tensor]
    save_invstd: Optional[Tensor]
    state: Optional[PRMState]


class Saved(NamedTuple):
    """Everything backward reads, as the op saved it."""
    c: Tensor
    y: Optional[Tensor]  # the output, when the ReLU is fused (its mask)
    norm: Optional[BatchNorm]
    save_mean: Optional[Tensor]
    save_invstd: Optional[Tensor]
    params: PRMParams
    state: PRMState
    options: PRMOptions
    has_identity: bool


class Needs(NamedTuple):
    """Which input gradients backward must produce."""
    c: bool
    bn_weight: bool
    bn_bias: bool


class Gradients(NamedTuple):
    """A backend's backward: None where not asked for (or not defined:
    theta and sigma without the position term)."""
    c: Optional[Tensor]
    identity: Optional[Tensor]
    bn_weight: Optional[Tensor]
    bn_bias: Optional[Tensor]
    params: Tuple[Optional[Tensor], ...]  # in PRMParams order


class KernelsBroken(RuntimeError):
    """Raised by a backend whose kernels cannot compile or launch on this
    machine (it has warned once and raises this on every later call):
    :func:`prm_det.ops.backends.forward` and ``backward`` run the call on
    :func:`prm_det.ops.backends.stand_in`, and ``select`` names it for the
    later calls."""

    def __init__(self, backend: str, reason: str) -> None:
        super().__init__(f'the {backend} kernels cannot run here: {reason}')
        self.backend = backend
        self.reason = reason
