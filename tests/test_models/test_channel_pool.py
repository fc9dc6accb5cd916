"""CBAM's pooling over the channels in its export form (a tree of
elementwise maxima and a product with a 1/c row, what ONNX Runtime runs
fast): the same max and mean at every channel count, and what an ONNX
export of CBAM holds."""
import io

import onnx
import pytest
import torch

from prm_det.models.layers import CBAM
from prm_det.models.layers.channel_pool import (_channel_max_tree,
                                                _channel_mean_product,
                                                channel_max_mean)


@pytest.mark.parametrize('channels', [1, 2, 3, 16, 17, 19, 48, 256, 2048])
def test_export_forms_equal_amax_and_mean(channels):
    x = torch.randn(2, channels, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(_channel_max_tree(x, channels),
                               x.amax(1, keepdim=True), rtol=0, atol=0)
    torch.testing.assert_close(_channel_mean_product(x, channels),
                               x.mean(1, keepdim=True))
    eager = channel_max_mean(x, channels)  # not exporting: amax and mean
    assert eager.shape == (2, 2, 5, 7)
    torch.testing.assert_close(eager[:, 0], x.amax(1), rtol=0, atol=0)
    torch.testing.assert_close(eager[:, 1], x.mean(1))


def test_max_tree_keeps_nan_and_inf_as_amax():
    x = torch.randn(1, 32, 3, 3)
    x[0, 5, 0, 0] = float('nan')
    x[0, 31, 1, 1] = float('inf')
    x[0, :, 2, 2] = float('-inf')
    torch.testing.assert_close(_channel_max_tree(x, 32),
                               x.amax(1, keepdim=True), equal_nan=True,
                               rtol=0, atol=0)


def _reductions(model, x):
    """(op type, axes) of every reduction in ``model``'s ONNX export."""
    buffer = io.BytesIO()
    torch.onnx.export(model.eval(), (x, ), buffer, dynamo=False,
                      opset_version=17, input_names=['x'],
                      dynamic_axes={'x': {2: 'h', 3: 'w'}})
    graph = onnx.load_from_string(buffer.getvalue()).graph
    return [(node.op_type, tuple(next(
        (a.ints for a in node.attribute if a.name == 'axes'), ())))
        for node in graph.node if node.op_type.startswith('Reduce')]


def test_cbam_exports_no_reduction_over_the_channels():
    x = torch.randn(1, 64, 9, 11)
    found = _reductions(CBAM(64), x)
    # the channel gate's mean and max over the positions, nothing else
    assert sorted(found) == [('ReduceMax', (2, 3)), ('ReduceMean', (2, 3))], \
        found
