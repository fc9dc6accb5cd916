"""SE-ResNet-50/101 state dicts with random tensors of the real shapes, what
the converter tests feed tools/model_converters/seresnet2prm_det.py.

The source state dicts are synthesized here as each source names its keys in
its published model definition:

* timm (huggingface/pytorch-image-models): ``timm/models/resnet.py``
  (Bottleneck: conv1, bn1, conv2, bn2, conv3, bn3, ``se``, downsample as
  ``nn.Sequential(conv, norm)``; stages ``layer1``-``layer4``; stem conv1,
  bn1; classifier ``fc``) and ``timm/layers/squeeze_excite.py`` (SEModule:
  ``fc1``, ``fc2`` 1x1 convs with bias, hidden ``make_divisible(c / 16, 8)``).
* MMPretrain (open-mmlab/mmpretrain): ``mmpretrain/models/backbones/
  seresnet.py`` (SEBottleneck adds ``se_layer``), ``resnet.py`` (norms named
  bn1..bn3 by build_norm_layer, ``downsample.0/1``),
  ``mmpretrain/models/utils/se_layer.py`` (``conv1``/``conv2`` ConvModules,
  so ``.conv.weight`` / ``.conv.bias``); an ImageClassifier saves them under
  ``backbone.`` and the LinearClsHead as ``head.fc``.
"""
import torch

BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def bn(prefix, channels):
    return {f'{prefix}.weight': (channels, ), f'{prefix}.bias': (channels, ),
            f'{prefix}.running_mean': (channels, ),
            f'{prefix}.running_var': (channels, ),
            f'{prefix}.num_batches_tracked': ()}


def bottleneck_resnet_shapes(depth, se_names):
    """ResNet-50/101 keys and shapes as torchvision, timm and MMPretrain
    name them; ``se_names(prefix, channels, hidden)`` adds the SE layer."""
    shapes = {'conv1.weight': (64, 3, 7, 7), **bn('bn1', 64)}
    inplanes = 64
    for stage, num_blocks in enumerate(BLOCKS[depth]):
        planes = 64 * 2**stage
        out = planes * 4
        for i in range(num_blocks):
            p = f'layer{stage + 1}.{i}'
            shapes.update({f'{p}.conv1.weight': (planes, inplanes, 1, 1),
                           **bn(f'{p}.bn1', planes),
                           f'{p}.conv2.weight': (planes, planes, 3, 3),
                           **bn(f'{p}.bn2', planes),
                           f'{p}.conv3.weight': (out, planes, 1, 1),
                           **bn(f'{p}.bn3', out)})
            shapes.update(se_names(p, out, out // 16))
            if i == 0:
                shapes[f'{p}.downsample.0.weight'] = (out, inplanes, 1, 1)
                shapes.update(bn(f'{p}.downsample.1', out))
            inplanes = out
    return shapes


def timm_state_dict(depth):
    def se(p, c, hidden):
        return {f'{p}.se.fc1.weight': (hidden, c, 1, 1),
                f'{p}.se.fc1.bias': (hidden, ),
                f'{p}.se.fc2.weight': (c, hidden, 1, 1),
                f'{p}.se.fc2.bias': (c, )}
    shapes = bottleneck_resnet_shapes(depth, se)
    shapes.update({'fc.weight': (1000, 2048), 'fc.bias': (1000, )})
    return random_tensors(shapes)


def mmpretrain_state_dict(depth):
    def se(p, c, hidden):
        return {f'{p}.se_layer.conv1.conv.weight': (hidden, c, 1, 1),
                f'{p}.se_layer.conv1.conv.bias': (hidden, ),
                f'{p}.se_layer.conv2.conv.weight': (c, hidden, 1, 1),
                f'{p}.se_layer.conv2.conv.bias': (c, )}
    shapes = {f'backbone.{k}': v
              for k, v in bottleneck_resnet_shapes(depth, se).items()}
    shapes.update({'head.fc.weight': (1000, 2048), 'head.fc.bias': (1000, )})
    return random_tensors(shapes)


def random_tensors(shapes):
    generator = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=generator) if s else
            torch.tensor(7) for k, s in shapes.items()}
