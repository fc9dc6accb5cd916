"""The local relation layer of LR-Net as a module.

Hu, Zhang, Xie & Lin, "Local Relation Networks for Image Recognition",
ICCV 2019. https://arxiv.org/abs/1904.11491

A replacement for a k x k convolution: 1x1 key and query embeddings (one
channel per aggregation group: ``channels_per_group`` = m input channels
share each group's weights), the appearance term ``phi(query, key)`` over
each k x k window, a geometric prior per group and window offset made by a
small network from the offsets' relative positions, a softmax over the
window, the aggregation of the input itself (the value) and a final 1x1
convolution. The query is taken at the output's positions (stride s: input
positions (i s, j s)). The aggregation is the op ``prm_det::local_relation``
(:mod:`prm_det.ops.local_relation`), which never materializes the k * k
windows; the layer runs as :func:`~prm_det.ops.local_relation_layer.
local_relation_layer`, whose backward keeps only the input and 1/m of a map
(it recomputes the query, the key and the aggregated map).

Details the paper leaves open, chosen here (docs/lr_net_facts.md lists the
sources): the key and query convolutions have no bias; the prior network is
1x1 conv (2 -> hidden, ReLU) then 1x1 conv (hidden -> groups) on the
offsets (row, column) divided by k // 2 (in [-1, 1]), hidden = max(groups //
2, 1); window offsets outside the map leave the softmax (the authors'
operator: logit -100, the same in float32).
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prm_det.ops.local_relation import SIMILARITIES
from prm_det.ops.local_relation_layer import local_relation_layer

from ..registry import register_model


def relative_positions(kernel_size: int) -> Tensor:
    """[1, 2, k, k]: each window offset's (row, column) over k // 2."""
    radius = kernel_size // 2
    offsets = torch.arange(kernel_size, dtype=torch.float32) - radius
    offsets = offsets / max(radius, 1)
    rows, cols = torch.meshgrid(offsets, offsets, indexing='ij')
    return torch.stack((rows, cols))[None]


def _pointwise(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """A 1x1 ``conv`` with bias of one map ``x`` [C, h, w], as a matmul."""
    weight = conv.weight.reshape(conv.out_channels, conv.in_channels)
    out = torch.addmm(conv.bias[:, None], weight, x.reshape(x.shape[0], -1))
    return out.view(conv.out_channels, *x.shape[1:])


@register_model
class LocalRelation2d(nn.Module):
    """Local relation layer.

    Args:
        in_channels (int): Input channels (the aggregated value's).
        out_channels (int, optional): Output channels (the final 1x1
            conv's). Defaults to ``in_channels``.
        kernel_size (int): Window side, odd. Defaults to 7 (the paper's).
        stride (int): Output stride. Defaults to 1.
        channels_per_group (int): m, input channels sharing one aggregation
            weight map; must divide ``in_channels``. Defaults to 8.
        similarity (str): phi, one of 'squared_difference' (the paper's
            default), 'dot_product', 'absolute_difference'.
        prior_hidden (int, optional): the prior network's hidden width.
            Defaults to max(groups // 2, 1).
        bias (bool): the final 1x1 conv's bias. Defaults to False (a norm
            follows in the blocks).
    """

    def __init__(self, in_channels: int, out_channels=None,
                 kernel_size: int = 7, stride: int = 1,
                 channels_per_group: int = 8,
                 similarity: str = 'squared_difference',
                 prior_hidden=None, bias: bool = False) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f'LocalRelation2d: kernel_size must be odd (the '
                             f'window is centred), got {kernel_size}')
        if channels_per_group < 1 or in_channels % channels_per_group:
            raise ValueError(
                f'LocalRelation2d: channels_per_group={channels_per_group} '
                f'must divide in_channels={in_channels}; pick a divisor of '
                f'{in_channels} or widths that are multiples of it')
        if similarity not in SIMILARITIES:
            raise ValueError(f'LocalRelation2d: similarity must be one of '
                             f'{SIMILARITIES}, got {similarity!r}')
        if stride < 1:
            raise ValueError(f'LocalRelation2d: stride must be >= 1, got '
                             f'{stride}')
        out_channels = out_channels or in_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = kernel_size, stride
        self.groups = in_channels // channels_per_group
        self.similarity = similarity
        hidden = prior_hidden or max(self.groups // 2, 1)
        self.query = nn.Conv2d(in_channels, self.groups, 1, bias=False)
        self.key = nn.Conv2d(in_channels, self.groups, 1, bias=False)
        self.prior_fc1 = nn.Conv2d(2, hidden, 1)
        self.prior_fc2 = nn.Conv2d(hidden, self.groups, 1)
        self.out = nn.Conv2d(in_channels, out_channels, 1, bias=bias)
        self.register_buffer('positions', relative_positions(kernel_size),
                             persistent=False)

    def prior(self) -> Tensor:
        """[groups, k, k]: the geometric prior's logits. The two 1x1 convs
        over the k * k offsets as matmuls (a conv call on a 7x7 map cost
        30-45 us on CPU, 34 calls an inference; the same multiply-adds)."""
        hidden = F.relu(_pointwise(self.prior_fc1, self.positions[0]))
        return _pointwise(self.prior_fc2, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return local_relation_layer(
            x, self.query.weight, self.key.weight, self.prior(),
            self.out.weight, self.out.bias, self.kernel_size, self.stride,
            self.similarity)

    def extra_repr(self) -> str:
        return (f'{self.in_channels}, {self.out_channels}, kernel_size='
                f'{self.kernel_size}, stride={self.stride}, groups='
                f'{self.groups}, similarity={self.similarity!r}')
