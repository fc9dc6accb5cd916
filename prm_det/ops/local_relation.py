"""The local relation aggregation of LR-Net (Hu, Zhang, Xie & Lin, "Local
Relation Networks for Image Recognition", ICCV 2019, arXiv 1904.11491).

For a value map ``value`` [b, C, H, W] split into G contiguous channel
groups (m = C / G channels each), one query and one key scalar per group
and position (``query`` [b, G, Ho, Wo] at the output's resolution, ``key``
[b, G, H, W]) and a geometric prior per group and window offset (``prior``
[G, k, k]), output position (i, j) aggregates the k x k window centred on
input position (i * stride, j * stride):

    logit[g, d] = phi(query[g, i, j], key[g, (i, j) * stride + d])
                  + prior[g, d]
    w[g, :]     = softmax over the offsets d inside the map of logit[g, :]
    out[c, i, j] = sum_d w[g(c), d] * value[c, (i, j) * stride + d]

with phi one of ``SIMILARITIES``: 'squared_difference' -(q - k)^2 (the
paper's default), 'dot_product' q * k, 'absolute_difference' -|q - k|
(the authors' operator's methods 5, 0 and 2; its ``scale`` on phi defaults
to 1 and is not a setting here: the learned key and query embeddings carry
any scale; docs/lr_net_facts.md has the operator's source facts).
Ho = (H - 1) // stride + 1 (a k x k conv's size with padding k // 2).

Offsets outside the map are left out of the softmax (the authors' operator
gives them the logit -100 + prior, which is the same to float32's
precision, and no value); the centre is always inside, so every window has
at least one term. Half-precision inputs are computed in float32; the
output has the value's dtype.

:func:`local_relation_reference` is the readable form (``F.unfold``: it
materializes k * k copies of the key and the value); :func:`local_relation`
is the op, ``prm_det::local_relation``, which keeps per output position only
the log-sum-exp of its window (1/m of the map) for backward and recomputes
the weights there, as the authors' operator does.
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

SIMILARITIES = ('squared_difference', 'dot_product', 'absolute_difference')


def output_size(size: int, stride: int) -> int:
    """An output side for an input side: (size - 1) // stride + 1."""
    return (size - 1) // stride + 1


def similarity(q: Tensor, k: Tensor, method: str) -> Tensor:
    """phi(q, k), elementwise."""
    if method == 'squared_difference':
        return -(q - k).square()
    if method == 'dot_product':
        return q * k
    if method == 'absolute_difference':
        return -(q - k).abs()
    raise ValueError(f'similarity must be one of {SIMILARITIES}, got '
                     f'{method!r}')


def similarity_grads(q: Tensor, k: Tensor,
                     method: str) -> Tuple[Tensor, Tensor]:
    """(d phi / d q, d phi / d k)."""
    if method == 'squared_difference':
        d = 2 * (q - k)
        return -d, d
    if method == 'dot_product':
        return k, q
    if method == 'absolute_difference':
        s = torch.sign(q - k)
        return -s, s
    raise ValueError(f'similarity must be one of {SIMILARITIES}, got '
                     f'{method!r}')


def check_inputs(query: Tensor, key: Tensor, value: Tensor, prior: Tensor,
                 kernel_size: int, stride: int, method: str) -> None:
    """Shapes and settings, each failure naming what would work."""
    if method not in SIMILARITIES:
        raise ValueError(f'local relation: similarity must be one of '
                         f'{SIMILARITIES}, got {method!r}')
    if (not isinstance(kernel_size, int) or kernel_size < 1
            or kernel_size % 2 == 0):
        raise ValueError(f'local relation: kernel_size must be a positive '
                         f'odd int (the window is centred), got '
                         f'{kernel_size!r}')
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f'local relation: stride must be a positive int, '
                         f'got {stride!r}')
    if value.dim() != 4 or key.dim() != 4 or query.dim() != 4:
        raise ValueError(
            f'local relation: query, key and value must be 4-d maps, got '
            f'{tuple(query.shape)}, {tuple(key.shape)}, '
            f'{tuple(value.shape)}')
    b, channels, h, w = value.shape
    groups = key.shape[1]
    if groups < 1 or channels % groups:
        raise ValueError(
            f'local relation: the value\'s {channels} channels must split '
            f'into the key\'s {groups} groups; give the key and the query '
            f'a divisor of {channels} channels')
    if tuple(key.shape) != (b, groups, h, w):
        raise ValueError(f'local relation: key must be {(b, groups, h, w)} '
                         f'(the value\'s batch and size), got '
                         f'{tuple(key.shape)}')
    expected = (b, groups, output_size(h, stride), output_size(w, stride))
    if tuple(query.shape) != expected:
        raise ValueError(f'local relation: query must be {expected} (the '
                         f'output\'s size at stride {stride}), got '
                         f'{tuple(query.shape)}')
    if tuple(prior.shape) != (groups, kernel_size, kernel_size):
        raise ValueError(f'local relation: prior must be '
                         f'{(groups, kernel_size, kernel_size)}, got '
                         f'{tuple(prior.shape)}')


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def local_relation_reference(query: Tensor, key: Tensor, value: Tensor,
                             prior: Tensor, kernel_size: int,
                             stride: int = 1,
                             method: str = 'squared_difference') -> Tensor:
    """The readable form: every window unfolded ([b, C, k*k, Ho*Wo]); the
    route taken while exporting."""
    if not torch.jit.is_tracing():  # a trace holds sizes as tensors
        check_inputs(query, key, value, prior, kernel_size, stride, method)
    dtype = _compute_dtype(value)
    q, k_, v, p = (t.to(dtype) for t in (query, key, value, prior))
    b, channels, h, w = v.shape
    groups, taps = k_.shape[1], kernel_size * kernel_size
    ho, wo = output_size(h, stride), output_size(w, stride)

    def windows(t: Tensor) -> Tensor:
        return F.unfold(t, kernel_size, padding=kernel_size // 2,
                        stride=stride).view(t.shape[0], t.shape[1], taps,
                                            ho * wo)

    inside = windows(torch.ones(1, 1, h, w, dtype=dtype,
                                device=v.device)) > 0   # [1, 1, taps, P]
    logits = similarity(q.reshape(b, groups, 1, ho * wo), windows(k_),
                        method) + p.reshape(1, groups, taps, 1)
    logits = logits.masked_fill(~inside, float('-inf'))
    weights = torch.softmax(logits, 2)                   # [b, G, taps, P]
    values = windows(v).view(b, groups, channels // groups, taps, ho * wo)
    out = (weights[:, :, None] * values).sum(3)
    return out.reshape(b, channels, ho, wo).to(value.dtype)
