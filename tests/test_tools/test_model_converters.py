"""tools/model_converters/seresnet2prm_det.py: timm and MMPretrain SE-ResNet
checkpoints load into prm_det's SEResNet with no missing or unexpected key.

The source state dicts: se_state_dicts.py.
"""
import os.path as osp
import sys

import pytest
import torch
from mmdet.registry import MODELS
from se_state_dicts import timm_state_dict, mmpretrain_state_dict
from tool_runs import REPO, tool_module

CONVERTER = 'model_converters/seresnet2prm_det.py'


def load_strictly(state_dict, depth):
    model = MODELS.build(dict(type='SEResNet', depth=depth))
    result = model.load_state_dict(state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model


@pytest.mark.parametrize('depth', [50, 101])
def test_timm_seresnet_loads_into_seresnet_with_no_missing_or_unexpected_key(
        depth):
    tool = tool_module(CONVERTER)
    source = timm_state_dict(depth)
    result = tool.convert(source)
    assert result.source == 'timm'
    assert result.dropped == ['fc.weight', 'fc.bias']
    assert result.unmapped == []
    assert tool.infer_depth(result.state_dict) == depth
    model = load_strictly(result.state_dict, depth)
    # the values went where they belong
    se = model.layer3[5].se
    assert torch.equal(se.conv1.conv.weight, source['layer3.5.se.fc1.weight'])
    assert torch.equal(se.conv2.conv.bias, source['layer3.5.se.fc2.bias'])
    assert torch.equal(model.layer2[0].downsample[1].running_var,
                       source['layer2.0.downsample.1.running_var'])


@pytest.mark.parametrize('depth', [50, 101])
def test_mmpretrain_seresnet_loads_into_seresnet_with_no_missing_or_unexpected_key(  # noqa: E501
        depth):
    tool = tool_module(CONVERTER)
    source = mmpretrain_state_dict(depth)
    result = tool.convert(source)
    assert result.source == 'mmpretrain'
    assert result.dropped == ['head.fc.weight', 'head.fc.bias']
    assert result.unmapped == []
    model = load_strictly(result.state_dict, depth)
    assert torch.equal(
        model.layer4[2].se.conv2.conv.weight,
        source['backbone.layer4.2.se_layer.conv2.conv.weight'])
    assert torch.equal(model.bn1.weight, source['backbone.bn1.weight'])


def test_keys_it_cannot_map_are_reported_not_dropped_silently():
    tool = tool_module(CONVERTER)
    source = timm_state_dict(50)
    source['layer1.0.attn.gate.weight'] = torch.zeros(3)
    result = tool.convert(source)
    assert result.unmapped == ['layer1.0.attn.gate.weight']


def test_command_line_converts_a_file_and_the_backbone_loads_it(tmp_path):
    tool = tool_module(CONVERTER)
    src, dst = tmp_path / 'mmpretrain_seresnet50.pth', tmp_path / 'out.pth'
    torch.save(dict(meta=dict(mmcls_version='0.x'),
                    state_dict=mmpretrain_state_dict(50)), src)
    tool.main([str(src), str(dst)])
    # as a config's init_cfg would load it
    from mmengine.runner import load_checkpoint
    model = MODELS.build(dict(type='SEResNet', depth=50))
    load_checkpoint(model, str(dst), strict=True)


def test_a_shape_that_does_not_fit_is_an_error_naming_the_key():
    tool = tool_module(CONVERTER)
    source = timm_state_dict(50)
    # timm rounds SE hidden channels to multiples of 8 (seresnet18's first
    # stage has 8, prm_det's SE 4): such a checkpoint must not load silently
    source['layer1.0.se.fc1.weight'] = torch.zeros(8, 256, 1, 1)
    result = tool.convert(source)
    with pytest.raises(tool.ConversionError, match='layer1.0.se.conv1.conv'):
        tool.check_against_seresnet(result.state_dict, 50)


def test_an_unknown_checkpoint_is_refused_with_the_reason():
    tool = tool_module(CONVERTER)
    with pytest.raises(tool.ConversionError, match='not an SE-ResNet'):
        tool.convert({'conv1.weight': torch.zeros(1)})


def without_num_batches_tracked(state_dict):
    """As checkpoints saved before PyTorch 0.4.1 (and many published ones):
    BatchNorms with no ``num_batches_tracked``."""
    stripped = {k: v for k, v in state_dict.items()
                if not k.endswith('.num_batches_tracked')}
    assert len(stripped) < len(state_dict)
    return stripped


def loaded_by_torch(state_dict, depth):
    """SEResNet after PyTorch's own ``load_state_dict`` of ``state_dict``
    (prm_det's keys), which fills a missing ``num_batches_tracked``."""
    model = MODELS.build(dict(type='SEResNet', depth=depth))
    model.load_state_dict(state_dict, strict=True)
    return model


def test_a_state_dict_without_num_batches_tracked_converts_as_torch_loads_it():
    tool = tool_module(CONVERTER)
    source = without_num_batches_tracked(timm_state_dict(50))
    result = tool.convert(source)
    assert result.unmapped == []
    tool.check_against_seresnet(result.state_dict, 50)  # nothing missing
    assert result.state_dict['layer2.0.downsample.1.num_batches_tracked'] \
        .dtype == torch.long
    converted = load_strictly(result.state_dict, 50).state_dict()
    renamed = {k: v for k, v in result.state_dict.items()
               if not k.endswith('.num_batches_tracked')}
    expected = loaded_by_torch(renamed, 50).state_dict()
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], expected[k]) for k in expected)
    assert all(converted[k] == 0 for k in converted
               if k.endswith('.num_batches_tracked'))


def test_num_batches_tracked_of_the_source_is_kept():
    tool = tool_module(CONVERTER)
    source = timm_state_dict(50)  # num_batches_tracked = 7 everywhere
    result = tool.convert(source)
    assert result.state_dict['bn1.num_batches_tracked'] == 7
    assert result.state_dict['layer4.2.bn3.num_batches_tracked'] == 7


@pytest.mark.slow
def test_command_line_converts_a_file_without_num_batches_tracked_quietly(
        tmp_path):
    """The converter run as a user runs it, from their folder, on an
    MMPretrain checkpoint whose BatchNorms have no num_batches_tracked: it
    converts without a word about that buffer, and the file loads strictly
    as PyTorch's load_state_dict loads the source."""
    from mmengine.runner import load_checkpoint
    from tool_runs import ok, outside_env, run_tool
    source = without_num_batches_tracked(mmpretrain_state_dict(50))
    src, dst = tmp_path / 'seresnet50_old.pth', tmp_path / 'se_r50.pth'
    torch.save(dict(state_dict=source), src)
    out = ok(run_tool([sys.executable, osp.join(
        REPO, 'tools', 'model_converters', 'seresnet2prm_det.py'), src.name,
        dst.name], cwd=str(tmp_path), env=outside_env()))
    assert 'mmpretrain layout, SE-ResNet-50' in out
    assert f'saved {dst.name}' in out
    assert 'num_batches_tracked' not in out and 'not mapped' not in out
    model = MODELS.build(dict(type='SEResNet', depth=50))
    load_checkpoint(model, str(dst), strict=True)
    renamed = {k[len('backbone.'):].replace('.se_layer.', '.se.'): v
               for k, v in source.items() if k.startswith('backbone.')}
    expected = loaded_by_torch(renamed, 50).state_dict()
    converted = model.state_dict()
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], expected[k]) for k in expected)
