"""SE/SGE/CBAM/BAM/SK-ResNet-50/101 state dicts as PytorchInsight and
attention-module save them, random tensors of the real shapes: what the
converter tests feed tools/model_converters/attention2prm_det.py.

Synthesized from the official code's parameter names and shapes, not from
prm_det's (github implus/PytorchInsight, classification/models/imagenet/
resnet_{se,sge,cbam,bam,sk}.py; github Jongchan/attention-module,
MODELS/model_resnet.py, cbam.py, bam.py), on torchvision's ResNet names
(se_state_dicts.bottleneck_resnet_shapes):

* SE (``SELayer``): ``se.fc`` = Sequential(Linear(c, c // 16), ReLU,
  Linear(c // 16, c), Sigmoid): ``se.fc.0``, ``se.fc.2``, weights [o, i].
* SGE (``SpatialGroupEnhance(64)``): ``sge.weight``, ``sge.bias``
  [1, 64, 1, 1].
* CBAM: ``cbam.ChannelGate.mlp`` = Sequential(Flatten, Linear(c, c // 16),
  ReLU, Linear(c // 16, c)): ``mlp.1``, ``mlp.3``;
  ``cbam.SpatialGate.spatial`` a BasicConv(2, 1, 7, relu=False): ``.conv``
  (no bias), ``.bn`` (BatchNorm2d(1)).
* BAM (``bam1``-``bam3`` on ResNet attributes, on 64, 128, 256 x 4
  channels): ``channel_att.gate_c`` = flatten, ``gate_c_fc_0``
  (Linear c -> c // 16), ``gate_c_bn_1`` (BatchNorm1d), relu,
  ``gate_c_fc_final`` (Linear c // 16 -> c); ``spatial_att.gate_s`` =
  ``gate_s_conv_reduce0`` (1x1 conv c -> c // 16, bias), ``gate_s_bn_reduce0``,
  relu, ``gate_s_conv_di_{0,1}`` (3x3, bias), ``gate_s_bn_di_{0,1}``,
  ``gate_s_conv_final`` (1x1 conv c // 16 -> 1, bias).
* SK (Bottleneck of ``planes``): ``conv2g`` (3x3, groups 32, no bias),
  ``bn2g``, ``conv_fc1`` (1x1 planes -> planes // 16, no bias), ``bn_fc1``,
  ``conv_fc2`` (1x1 planes // 16 -> 2 * planes, no bias).

The checkpoint files: PytorchInsight's ``classification/imagenet.py`` saves
``{'epoch', 'state_dict', 'acc', 'best_acc', 'optimizer'}``,
attention-module's ``train_imagenet.py`` ``{'epoch', 'arch', 'state_dict',
'best_prec1', 'optimizer'}``, both from a ``DataParallel`` model (``module.``
keys).
"""
import torch
from se_state_dicts import bn, bottleneck_resnet_shapes, random_tensors

KINDS = ('se', 'sge', 'cbam', 'bam', 'sk')


def linear(prefix, out, inp):
    return {f'{prefix}.weight': (out, inp), f'{prefix}.bias': (out, )}


def conv(prefix, out, inp, k, bias=True):
    shapes = {f'{prefix}.weight': (out, inp, k, k)}
    if bias:
        shapes[f'{prefix}.bias'] = (out, )
    return shapes


def block_attention(kind):
    """``(prefix, channels, hidden)`` -> the block's attention shapes."""
    def se(p, c, hidden):
        return {**linear(f'{p}.se.fc.0', hidden, c),
                **linear(f'{p}.se.fc.2', c, hidden)}

    def sge(p, c, hidden):
        return {f'{p}.sge.weight': (1, 64, 1, 1),
                f'{p}.sge.bias': (1, 64, 1, 1)}

    def cbam(p, c, hidden):
        return {**linear(f'{p}.cbam.ChannelGate.mlp.1', hidden, c),
                **linear(f'{p}.cbam.ChannelGate.mlp.3', c, hidden),
                **conv(f'{p}.cbam.SpatialGate.spatial.conv', 1, 2, 7,
                       bias=False),
                **bn(f'{p}.cbam.SpatialGate.spatial.bn', 1)}

    def sk(p, c, hidden):
        planes = c // 4
        return {**conv(f'{p}.conv2g', planes, planes // 32, 3, bias=False),
                **bn(f'{p}.bn2g', planes),
                **conv(f'{p}.conv_fc1', planes // 16, planes, 1, bias=False),
                **bn(f'{p}.bn_fc1', planes // 16),
                **conv(f'{p}.conv_fc2', 2 * planes, planes // 16, 1,
                       bias=False)}

    def none(p, c, hidden):
        return {}

    return dict(se=se, sge=sge, cbam=cbam, sk=sk, bam=none)[kind]


def bam_shapes():
    shapes = {}
    for i, c in enumerate((256, 512, 1024), 1):
        hidden = c // 16
        gate_c, gate_s = f'bam{i}.channel_att.gate_c', f'bam{i}.spatial_att.gate_s'
        shapes.update({
            **linear(f'{gate_c}.gate_c_fc_0', hidden, c),
            **bn(f'{gate_c}.gate_c_bn_1', hidden),
            **linear(f'{gate_c}.gate_c_fc_final', c, hidden),
            **conv(f'{gate_s}.gate_s_conv_reduce0', hidden, c, 1),
            **bn(f'{gate_s}.gate_s_bn_reduce0', hidden),
            **conv(f'{gate_s}.gate_s_conv_di_0', hidden, hidden, 3),
            **bn(f'{gate_s}.gate_s_bn_di_0', hidden),
            **conv(f'{gate_s}.gate_s_conv_di_1', hidden, hidden, 3),
            **bn(f'{gate_s}.gate_s_bn_di_1', hidden),
            **conv(f'{gate_s}.gate_s_conv_final', 1, hidden, 1)})
    return shapes


def official_state_dict(kind, depth, num_batches_tracked=True):
    """The model's ``state_dict()`` (no ``module.``) of the official
    ``{kind}_resnet{depth}``, classifier ``fc`` included."""
    shapes = bottleneck_resnet_shapes(depth, block_attention(kind))
    if kind == 'bam':
        shapes.update(bam_shapes())
    shapes.update(linear('fc', 1000, 2048))
    if not num_batches_tracked:  # saved before PyTorch 0.4.1
        shapes = {k: v for k, v in shapes.items()
                  if not k.endswith('.num_batches_tracked')}
    return random_tensors(shapes)


def pytorchinsight_checkpoint(state_dict):
    """As PytorchInsight's classification/imagenet.py saves one."""
    return {'epoch': 100,
            'state_dict': {f'module.{k}': v for k, v in state_dict.items()},
            'acc': 77.5, 'best_acc': 77.6,
            'optimizer': {'state': {}, 'param_groups': [
                {'lr': 0.0, 'momentum': 0.9, 'params': [0, 1]}]}}


def attention_module_checkpoint(state_dict, arch='resnet'):
    """As attention-module's train_imagenet.py saves one."""
    return {'epoch': 90, 'arch': arch,
            'state_dict': {f'module.{k}': v for k, v in state_dict.items()},
            'best_prec1': torch.tensor(77.3),
            'optimizer': {'state': {}, 'param_groups': [
                {'lr': 0.0001, 'momentum': 0.9, 'params': [0, 1]}]}}
