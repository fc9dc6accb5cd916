"""BatchNorm for the small maps inside attention modules.

CBAM's spatial gate, BAM's channel and spatial gates and SK's squeeze layer
hold BatchNorm layers over pooled vectors or 1-channel maps. On a batch of
one image (common in detection: one image a GPU) such a layer sees a single
value per channel, where torch's BatchNorm refuses to train ("Expected more
than 1 value per channel when training") and a hand-made variance would be
0/0. The rule prm_det follows: **a gate's BatchNorm that sees one value per
channel while training normalizes with its running statistics and leaves
them unchanged** (as in evaluation); with two values or more it is torch's
BatchNorm exactly, so the official modules' outputs, gradients and running
statistics are reproduced wherever they are defined.

The state-dict keys are BatchNorm's, so official checkpoints load as they
are, and SyncBN conversion (``convert_sync_batchnorm``) still finds them.
"""
import torch.nn.functional as F
from torch import Tensor, nn


class _OneValueFallback:
    """Mixin over a torch BatchNorm class: the rule above."""

    def forward(self, x: Tensor) -> Tensor:
        if (self.training and self.running_mean is not None
                and x.numel() <= x.shape[1]):  # one value per channel
            return F.batch_norm(x, self.running_mean, self.running_var,
                                self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


class GateBatchNorm1d(_OneValueFallback, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` that falls back to its running statistics on one
    value per channel (module docstring)."""


class GateBatchNorm2d(_OneValueFallback, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that falls back to its running statistics on one
    value per channel (module docstring)."""
