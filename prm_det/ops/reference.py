"""Position-aware Recalibration Module (PRM): the readable reference.

Ma & Fu, "Position-Aware Recalibration Module: Learning From Feature Semantics
and Feature Position", IJCAI 2020. https://www.ijcai.org/proceedings/2020/111

For a feature map ``x`` of shape [b, c, h, w] split into ``groups`` contiguous
channel blocks, each group computes

    S = alpha * phi(x_p, q) * D_p + beta * phi(x_p, z)
    gate = sigmoid(lambda * N(S) + xi),  y = x * gate

where ``q`` is the group's feature vector at the argmax of its channel sum,
``z`` its spatial mean, ``D`` the mean of two 1-D Gaussians of the row and
column distance to the query position, and ``N`` the normalization over the
positions with the unbiased standard deviation. With default options this is
exactly what the official code computes (see ../shared/docs/PRM_SPEC.md), minus
its faults: no device sync, no ``nonzero``, no distribution objects per call,
no full-size copy of the gate, and a defined result for 1x1 maps.

:func:`prm_reference` is plain autograd ops, every mode and option, written
to be read: it is the oracle every backend of :mod:`prm_det.ops` is tested
against, and the traceable route taken while exporting (ONNX). Torch only.
"""
import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

MODES = ('dotproduct', 'cosine', 'l1norm')
NORM_EPS = 1e-5  # added to the std in the semantic normalization (official)
COSINE_EPS = 1e-8  # as torch.cosine_similarity
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
# The variance is clamped to this before the square root so that a constant
# map (variance 0) gives std 0 with a zero gradient instead of 0/0 = NaN.
_TINY_VAR = 1e-30


def at_least_one(size):
    """``max(size, 1)`` for a size (h, w, h * w) that stays a function of the
    input's size when the model is traced.

    A Python ``max()`` would bake the size the trace saw into the graph (an
    ONNX export then divides by it at every size). torch.jit's tracer (the
    TorchScript ONNX exporter) gives sizes as 0-d tensors: a ``clamp_min``
    op; ``torch.export`` (the dynamo exporter) gives symbolic ints:
    ``sym_max``; eager gives ints, and ``sym_max`` is ``max``.
    """
    if isinstance(size, Tensor):
        return size.clamp_min(1)
    return torch.sym_max(size, 1)


def gaussian(t: Tensor, sigma: Tensor) -> Tensor:
    """Density of Normal(0, sigma) at ``t`` (what the official code gets from
    ``Normal(0, sigma).log_prob(t).exp()``)."""
    return torch.exp(-0.5 * (t / sigma)**2) * (_INV_SQRT_2PI / sigma)


def axis_distances(query_index: Tensor, h: int, w: int, normalized: bool,
                   dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """Row and column distances of every pixel to each query position.

    Args:
        query_index (Tensor): flat index (row * w + col) of the query, [n].
        h, w (int): feature map size.
        normalized (bool): divide by (h - 1) and (w - 1) so that distances are
            in [0, 1] (the slides); otherwise integer pixel distances (the
            official code).

    Returns:
        tuple[Tensor, Tensor]: |row - row_q| of shape [n, h] and
        |col - col_q| of shape [n, w].
    """
    device = query_index.device
    query_row = torch.div(query_index, w, rounding_mode='floor')  # [n]
    query_col = query_index - query_row * w  # [n]
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    d_row = (rows[None, :] - query_row[:, None]).abs().to(dtype)  # [n, h]
    d_col = (cols[None, :] - query_col[:, None]).abs().to(dtype)  # [n, w]
    if normalized:
        d_row = d_row / at_least_one(h - 1)
        d_col = d_col / at_least_one(w - 1)
    return d_row, d_col


def position_weight(query_index: Tensor, h: int, w: int, theta: Tensor,
                    sigma: Tensor, normalized: bool = False) -> Tensor:
    """D = (G(theta_row * d_row) + G(theta_col * d_col)) / 2, shape [n, h*w].

    The mean of two 1-D Gaussians is separable, so it is built from an [n, h]
    and an [n, w] table instead of per-pixel distance maps.
    """
    theta = theta.reshape(2)
    d_row, d_col = axis_distances(query_index, h, w, normalized, theta.dtype)
    g_row = gaussian(theta[0] * d_row, sigma)  # [n, h]
    g_col = gaussian(theta[1] * d_col, sigma)  # [n, w]
    return (0.5 * (g_row[:, :, None] + g_col[:, None, :])).flatten(1)


def _similarity(x: Tensor, key: Tensor, mode: str) -> Tensor:
    """phi(x_p, key) for every position p. x: [n, cg, P], key: [n, cg]."""
    if mode == 'dotproduct':
        return torch.bmm(key[:, None, :], x).squeeze(1)  # [n, P]
    if mode == 'cosine':
        return F.cosine_similarity(x, key[:, :, None], dim=1, eps=COSINE_EPS)
    if mode == 'l1norm':
        return -(x - key[:, :, None]).abs().sum(1)
    raise ValueError(f'mode must be one of {MODES}, got {mode!r}')


def normalize_over_positions(s: Tensor, eps: float) -> Tensor:
    """(s - mean) / (std + eps) over the last dim, std unbiased; 0 when P=1."""
    num_positions = s.shape[-1]
    centered = s - s.mean(-1, keepdim=True)
    var = (centered.pow(2).sum(-1, keepdim=True) /
           at_least_one(num_positions - 1))
    std = var.clamp_min(_TINY_VAR).sqrt()
    return centered / (std + eps)


class PRMIntermediates(NamedTuple):
    """What :func:`prm_reference_with_intermediates` computes on the way to
    its output, one entry per (sample, group), b samples, g groups.

    Fields:
        query_index (Tensor): [b, g], the query's flat position row * w + col
            (the first argmax of the group's channel sum).
        query_rc (Tensor): [b, g, 2], the query's (row, col).
        position_weight (Tensor): [b, g, h, w], D (the options' distances;
            computed even where ``use_position`` is off, as a picture of it).
        similarity (Tensor): [b, g, h, w], S before the normalization.
        gate (Tensor): [b, g, h, w], sigmoid(lambda * N(S) + xi), what the
            group's channels are multiplied by.
    """
    query_index: Tensor
    query_rc: Tensor
    position_weight: Tensor
    similarity: Tensor
    gate: Tensor


def _prm(x: Tensor, weight: Tensor, bias: Tensor, one: Tensor, zero: Tensor,
         theta: Tensor, scale: Tensor, groups: int, mode: str,
         use_position: bool, use_norm: bool, normalized_positions: bool,
         eps: float, keep: bool) -> Tuple[Tensor, Optional[PRMIntermediates]]:
    """The reference's body; ``keep``: also return its intermediates (ops
    beyond the output's only then: a trace of the output sees none)."""
    b, c, h, w = x.shape
    n, cg, num_positions = b * groups, c // groups, h * w
    xg = x.reshape(n, cg, num_positions)  # [n, cg, P]
    # standard ops only (argmax, gather), no host sync: this is the route
    # taken while exporting
    query_index = xg.detach().sum(1).argmax(1)  # [n], first maximum
    query = xg.gather(2, query_index.view(-1, 1, 1).expand(-1, cg, 1))
    query = query.squeeze(2)  # [n, cg]
    context = xg.mean(2)  # [n, cg]
    sim_query = _similarity(xg, query, mode)  # [n, P]
    sim_context = _similarity(xg, context, mode)  # [n, P]
    d = None
    if use_position or keep:
        d = position_weight(query_index, h, w, theta, scale,
                            normalized_positions)  # [n, P]
    if use_position:
        sim_query = sim_query * d
    s = (zero * sim_query.view(b, groups, num_positions) +
         one * sim_context.view(b, groups, num_positions))  # [b, g, P]
    s_normalized = normalize_over_positions(s, eps) if use_norm else s
    gate = torch.sigmoid(s_normalized * weight.view(1, groups, 1) +
                         bias.view(1, groups, 1))  # [b, g, P]
    y = x.view(b, groups, cg, num_positions) * gate[:, :, None, :]
    y = y.view(b, c, h, w)
    if not keep:
        return y, None
    rows = torch.div(query_index, w, rounding_mode='floor')
    query_rc = torch.stack([rows, query_index - rows * w], 1)
    return y, PRMIntermediates(
        query_index=query_index.view(b, groups),
        query_rc=query_rc.view(b, groups, 2),
        position_weight=d.view(b, groups, h, w),
        similarity=s.view(b, groups, h, w),
        gate=gate.view(b, groups, h, w))


def prm_reference(x: Tensor,
                  weight: Tensor,
                  bias: Tensor,
                  one: Tensor,
                  zero: Tensor,
                  theta: Tensor,
                  scale: Tensor,
                  groups: int,
                  mode: str = 'dotproduct',
                  use_position: bool = True,
                  use_norm: bool = True,
                  normalized_positions: bool = False,
                  eps: float = NORM_EPS) -> Tensor:
    """The readable PRM: plain autograd ops, every mode and option.

    Parameters use the official names: ``weight`` = lambda [1, g, 1, 1],
    ``bias`` = xi [1, g, 1, 1], ``one`` = beta [1, g, 1], ``zero`` = alpha
    [1, g, 1], ``theta`` [1, 2, 1, 1] (row, col), ``scale`` = sigma [1].
    """
    y, _ = _prm(x, weight, bias, one, zero, theta, scale, groups, mode,
                use_position, use_norm, normalized_positions, eps, keep=False)
    return y


def prm_reference_with_intermediates(
        x: Tensor,
        weight: Tensor,
        bias: Tensor,
        one: Tensor,
        zero: Tensor,
        theta: Tensor,
        scale: Tensor,
        groups: int,
        mode: str = 'dotproduct',
        use_position: bool = True,
        use_norm: bool = True,
        normalized_positions: bool = False,
        eps: float = NORM_EPS) -> Tuple[Tensor, PRMIntermediates]:
    """:func:`prm_reference`'s output and the :class:`PRMIntermediates` it
    computed it from (query positions, D, S, gate): what a picture of PRM
    draws, from the same ops."""
    return _prm(x, weight, bias, one, zero, theta, scale, groups, mode,
                use_position, use_norm, normalized_positions, eps, keep=True)


def prm_reference_of(x: Tensor, params, options,
                     intermediates: bool = False):
    """:func:`prm_reference` (or, with ``intermediates``,
    :func:`prm_reference_with_intermediates`) with a PRM's parameters and
    options as the layer holds them (:class:`~prm_det.ops.contract.PRMParams`
    and :class:`~prm_det.ops.contract.PRMOptions`, e.g. ``prm._params()``
    and ``prm.options``)."""
    run = (prm_reference_with_intermediates if intermediates else
           prm_reference)
    return run(x, *params, groups=options.groups, mode=options.mode,
               use_position=options.use_position, use_norm=options.use_norm,
               normalized_positions=options.normalized_positions,
               eps=options.eps)
