"""tools/model_converters/attention2prm_det.py and its SE-only name
seresnet2prm_det.py: PytorchInsight's and attention-module's SE/SGE/CBAM/
BAM/SK-ResNets and timm's and MMPretrain's SE-ResNets load into prm_det's
backbones with no missing or unexpected key, every tensor at its place.

The source state dicts: se_state_dicts.py, attention_state_dicts.py.
"""
import argparse
import os.path as osp
import sys

import pytest
import torch
from attention_state_dicts import (attention_module_checkpoint,
                                   official_state_dict,
                                   pytorchinsight_checkpoint)
from mmdet.registry import MODELS
from se_state_dicts import mmpretrain_state_dict, timm_state_dict
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


# --- tools/model_converters/attention2prm_det.py: every published layout ---

ATTENTION = 'model_converters/attention2prm_det.py'
BACKBONES = dict(se='SEResNet', sge='SGEResNet', cbam='CBAMResNet',
                 bam='BAMResNet', sk='SKResNet')
# official name fragment -> prm_det's, as the layers document their names
# (prm_det/models/layers/{cbam,bam,sk}.py; mmdet's SELayer: two ConvModules)
EXPECTED_NAMES = {
    'se': [('.se.fc.0.', '.se.conv1.conv.'), ('.se.fc.2.', '.se.conv2.conv.')],
    'sge': [],
    'cbam': [('.cbam.ChannelGate.mlp.1.', '.cbam.channel_fc1.'),
             ('.cbam.ChannelGate.mlp.3.', '.cbam.channel_fc2.'),
             ('.cbam.SpatialGate.spatial.conv.', '.cbam.spatial_conv.'),
             ('.cbam.SpatialGate.spatial.bn.', '.cbam.spatial_norm.')],
    'bam': [('.channel_att.gate_c.gate_c_fc_0.', '.channel_fc1.'),
            ('.channel_att.gate_c.gate_c_bn_1.', '.channel_norm.'),
            ('.channel_att.gate_c.gate_c_fc_final.', '.channel_fc2.'),
            ('.spatial_att.gate_s.gate_s_conv_reduce0.',
             '.spatial_reduce.conv.'),
            ('.spatial_att.gate_s.gate_s_bn_reduce0.', '.spatial_reduce.bn.'),
            ('.spatial_att.gate_s.gate_s_conv_di_0.',
             '.spatial_dilated.0.conv.'),
            ('.spatial_att.gate_s.gate_s_bn_di_0.', '.spatial_dilated.0.bn.'),
            ('.spatial_att.gate_s.gate_s_conv_di_1.',
             '.spatial_dilated.1.conv.'),
            ('.spatial_att.gate_s.gate_s_bn_di_1.', '.spatial_dilated.1.bn.'),
            ('.spatial_att.gate_s.gate_s_conv_final.', '.spatial_out.')],
    'sk': [('.conv2g.', '.sk.grouped_conv.'), ('.bn2g.', '.sk.grouped_norm.'),
           ('.conv_fc1.', '.sk.squeeze_conv.'),
           ('.bn_fc1.', '.sk.squeeze_norm.'),
           ('.conv_fc2.', '.sk.select_conv.')],
}


def expected_name(kind, key):
    for official, ours in EXPECTED_NAMES[kind]:
        if official in f'.{key}':
            return f'.{key}'.replace(official, ours, 1)[1:]
    return key


def spot_checks(kind, model, source):
    """(prm_det tensor by attribute, the official tensor it must equal)."""
    if kind == 'se':
        se = model.layer3[5].se
        return [(se.conv1.conv.weight[:, :, 0, 0],
                 source['layer3.5.se.fc.0.weight']),
                (se.conv2.conv.weight[:, :, 0, 0],
                 source['layer3.5.se.fc.2.weight']),
                (se.conv2.conv.bias, source['layer3.5.se.fc.2.bias'])]
    if kind == 'sge':
        return [(model.layer4[2].sge.weight, source['layer4.2.sge.weight']),
                (model.layer1[0].sge.bias, source['layer1.0.sge.bias'])]
    if kind == 'cbam':
        cbam = model.layer2[3].cbam
        return [(cbam.channel_fc1.weight,
                 source['layer2.3.cbam.ChannelGate.mlp.1.weight']),
                (cbam.channel_fc2.bias,
                 source['layer2.3.cbam.ChannelGate.mlp.3.bias']),
                (cbam.spatial_conv.weight,
                 source['layer2.3.cbam.SpatialGate.spatial.conv.weight']),
                (cbam.spatial_norm.running_var,
                 source['layer2.3.cbam.SpatialGate.spatial.bn.running_var'])]
    if kind == 'bam':
        return [(model.bam1.channel_norm.running_mean,
                 source['bam1.channel_att.gate_c.gate_c_bn_1.running_mean']),
                (model.bam2.channel_fc2.weight,
                 source['bam2.channel_att.gate_c.gate_c_fc_final.weight']),
                (model.bam3.spatial_dilated[1].conv.weight,
                 source['bam3.spatial_att.gate_s.gate_s_conv_di_1.weight']),
                (model.bam3.spatial_out.bias,
                 source['bam3.spatial_att.gate_s.gate_s_conv_final.bias'])]
    sk = model.layer3[0].sk
    return [(sk.grouped_conv.weight, source['layer3.0.conv2g.weight']),
            (sk.grouped_norm.running_mean, source['layer3.0.bn2g.running_mean']),
            (sk.squeeze_conv.weight, source['layer3.0.conv_fc1.weight']),
            (sk.select_conv.weight, source['layer3.0.conv_fc2.weight']),
            # the dense branch is the block's own conv2 / bn2
            (model.layer3[0].conv2.weight, source['layer3.0.conv2.weight']),
            (model.layer3[0].bn2.bias, source['layer3.0.bn2.bias'])]


def build(kind, depth):
    return MODELS.build(dict(type=BACKBONES[kind], depth=depth))


def save_official(path, kind, depth, saved_by):
    """An official checkpoint file of ``kind``: PytorchInsight's, or
    attention-module's (CBAM and BAM only; torch 0.4 era: the legacy file
    format, no num_batches_tracked)."""
    if saved_by == 'pytorchinsight':
        source = official_state_dict(kind, depth)
        torch.save(pytorchinsight_checkpoint(source), path)
    else:
        source = official_state_dict(kind, depth, num_batches_tracked=False)
        torch.save(attention_module_checkpoint(source, f'resnet{depth}'),
                   path, _use_new_zipfile_serialization=False)
    return source


def converts_completely(tmp_path, capsys, kind, depth, saved_by):
    """The CLI in-process on an official file: what it prints, a checked
    load with no allow_partial, every official tensor at its place."""
    tool = tool_module(ATTENTION)
    src, dst = tmp_path / f'{kind}_resnet{depth}.pth.tar', tmp_path / 'o.pth'
    source = save_official(src, kind, depth, saved_by)
    result = tool.main([str(src), str(dst)])
    assert (result.kind, result.source) == (kind, 'pytorchinsight')
    assert result.dropped == ['fc.weight', 'fc.bias']
    out = capsys.readouterr().out
    assert f'pytorchinsight layout, {kind.upper()}-ResNet-{depth}' in out
    assert f'model.backbone.type={BACKBONES[kind]}' in out
    assert f'configs/retinanet_{kind}_r50.py' in out
    assert f'model.backbone.init_cfg.checkpoint={dst}' in out
    (command, ) = [line.strip() for line in out.splitlines()
                   if line.strip().startswith('python tools/train.py')]
    # the r50 config, at depth 101 with the depth changed
    assert (f'model.backbone.depth={depth}' in command) == (depth != 50)
    saved = torch.load(dst, weights_only=True)
    assert saved['meta'] == dict(converted_from=src.name,
                                 source='pytorchinsight', kind=kind,
                                 backbone=BACKBONES[kind], depth=depth)

    from prm_det.models.backbones.pretrained import load_pretrained
    model = build(kind, depth)
    report = load_pretrained(model, str(dst), allow_partial=False)
    state = model.state_dict()
    assert report.complete and not report.optional_missing
    assert sorted(report.loaded) == sorted(state)  # num_batches_tracked too

    # every official tensor (but the classifier) at its prm_det name, and
    # nothing else in the backbone but filled num_batches_tracked
    placed = {}
    for key, value in source.items():
        if key.startswith('fc.'):
            continue
        name = expected_name(kind, key)
        assert name not in placed, name
        placed[name] = value
        assert torch.equal(state[name].reshape(value.shape), value), key
        assert state[name].shape == value.shape or kind == 'se'
    for name in set(state) - set(placed):
        assert name.endswith('num_batches_tracked') and state[name] == 0
    assert (set(state) == set(placed)) == (saved_by == 'pytorchinsight')
    for ours, official in spot_checks(kind, model, source):
        assert torch.equal(ours, official)


@pytest.mark.parametrize('kind', ['se', 'sge', 'cbam', 'bam', 'sk'])
def test_pytorchinsight_resnet50_converts_and_loads_with_no_allow_partial(
        tmp_path, capsys, kind):
    converts_completely(tmp_path, capsys, kind, 50, 'pytorchinsight')


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['se', 'sge', 'cbam', 'bam', 'sk'])
def test_pytorchinsight_resnet101_converts_and_loads_with_no_allow_partial(
        tmp_path, capsys, kind):
    converts_completely(tmp_path, capsys, kind, 101, 'pytorchinsight')


@pytest.mark.parametrize('kind', ['cbam', 'bam'])
def test_attention_module_resnet50_legacy_file_without_num_batches_tracked(
        tmp_path, capsys, kind):
    converts_completely(tmp_path, capsys, kind, 50, 'attention-module')


def test_pytorchinsight_se_linear_weights_become_1x1_convs():
    from prm_det.models.converters import convert
    source = official_state_dict('se', 50)
    result = convert({f'module.{k}': v for k, v in source.items()})
    assert result.state_dict['layer1.0.se.conv1.conv.weight'].shape == \
        (16, 256, 1, 1)
    assert result.state_dict['layer4.2.se.conv2.conv.weight'].shape == \
        (2048, 128, 1, 1)
    assert result.state_dict['layer4.2.se.conv2.conv.bias'] is \
        source['layer4.2.se.fc.2.bias']
    assert result.unmapped == []


@pytest.mark.parametrize('layout', ['timm', 'mmpretrain'])
def test_attention_converter_takes_the_se_converters_layouts(
        tmp_path, capsys, layout):
    tool = tool_module(ATTENTION)
    source = (timm_state_dict if layout == 'timm' else
              mmpretrain_state_dict)(50)
    src, dst = tmp_path / 'se.pth', tmp_path / 'out.pth'
    torch.save(source, src)
    result = tool.main([str(src), str(dst)])
    assert (result.kind, result.source) == ('se', layout)
    assert f'{layout} layout, SE-ResNet-50' in capsys.readouterr().out
    from mmengine.runner import load_checkpoint
    load_checkpoint(build('se', 50), str(dst), strict=True)


def test_timms_safetensors_weights_convert_as_its_pth(tmp_path):
    """timm's hub weights are a model.safetensors: the same tensors as its
    .pth, the same converted file."""
    from safetensors.torch import save_file
    tool = tool_module(ATTENTION)
    source = timm_state_dict(50)
    src = tmp_path / 'model.safetensors'
    save_file({k: v.contiguous() for k, v in source.items()}, str(src))
    result = tool.main([str(src), str(tmp_path / 'out.pth')])
    assert (result.kind, result.source) == ('se', 'timm')
    from mmengine.runner import load_checkpoint
    model = build('se', 50)
    load_checkpoint(model, str(tmp_path / 'out.pth'), strict=True)
    torch.testing.assert_close(model.layer1[0].se.conv1.conv.weight,
                               source['layer1.0.se.fc1.weight'])


def unrecognized(tool, tmp_path, state_dict):
    """The ConversionError main raises for ``state_dict`` in a file; nothing
    is saved."""
    src, dst = tmp_path / 'unknown.pth', tmp_path / 'out.pth'
    torch.save({'epoch': 1, 'state_dict': state_dict}, src)
    with pytest.raises(tool.ConversionError) as error:
        tool.main([str(src), str(dst)])
    assert not dst.exists()
    return str(error.value)


def test_an_unrecognized_file_is_refused_naming_its_keys_and_the_layouts(
        tmp_path):
    tool = tool_module(ATTENTION)
    message = unrecognized(tool, tmp_path, {
        'module.encoder.0.weight': torch.zeros(2),
        'module.encoder.0.bias': torch.zeros(2)})
    assert 'not a checkpoint of an attention ResNet' in message
    assert "'encoder.0.weight', 'encoder.0.bias'" in message
    # what each known layout looks like
    for example in ('layer1.0.se.fc.0.weight', 'layer1.0.se.fc1.weight',
                    'backbone.layer1.0.se_layer.conv1.conv.weight',
                    'layer1.0.sge.weight',
                    'layer1.0.cbam.ChannelGate.mlp.1.weight',
                    'bam1.channel_att.gate_c.gate_c_fc_0.weight',
                    'layer1.0.conv2g.weight'):
        assert example in message


def test_a_plain_resnet_is_refused_as_needing_no_conversion(tmp_path):
    tool = tool_module(ATTENTION)
    plain = official_state_dict('bam', 50)  # BAM's blocks are plain ones
    plain = {k: v for k, v in plain.items() if not k.startswith('bam')}
    message = unrecognized(tool, tmp_path, plain)
    assert 'a plain ResNet needs no conversion' in message
    assert "'conv1.weight'" in message


def test_an_already_converted_file_is_refused_as_loading_as_it_is(tmp_path):
    tool = tool_module(ATTENTION)
    converted = build('cbam', 50).state_dict()
    message = unrecognized(tool, tmp_path, converted)
    assert "prm_det's own attention keys" in message


def test_keys_of_two_attentions_are_refused(tmp_path):
    tool = tool_module(ATTENTION)
    mixed = {**official_state_dict('cbam', 50),
             'layer1.0.se.fc.0.weight': torch.zeros(16, 256)}
    message = unrecognized(tool, tmp_path, mixed)
    assert 'more than one attention layout' in message
    assert 'CBAM-ResNet' in message and 'SE-ResNet' in message


def test_a_key_that_maps_to_nothing_is_refused_not_dropped(tmp_path):
    tool = tool_module(ATTENTION)
    source = official_state_dict('cbam', 50)
    source['layer1.0.cbam.ChannelGate.mlp.5.weight'] = torch.zeros(3)
    message = unrecognized(tool, tmp_path, source)
    assert 'layer1.0.cbam.ChannelGate.mlp.5.weight' in message
    assert 'nothing saved' in message


def test_a_shape_prm_det_has_not_is_refused_naming_the_key(tmp_path):
    tool = tool_module(ATTENTION)
    source = official_state_dict('sge', 50)
    source['layer2.1.sge.weight'] = torch.zeros(1, 32, 1, 1)  # 32 groups
    message = unrecognized(tool, tmp_path, source)
    assert 'layer2.1.sge.weight: (1, 32, 1, 1) here, (1, 64, 1, 1)' in message


def test_a_refused_file_ends_the_command_with_one_error_line(tmp_path):
    tool = tool_module(ATTENTION)
    src = tmp_path / 'unknown.pth'
    torch.save({'encoder.weight': torch.zeros(1)}, src)
    with pytest.raises(SystemExit) as exit_:
        tool.run(lambda: tool.main([str(src), str(tmp_path / 'out.pth')]))
    assert str(exit_.value.code).startswith(
        '[convert] error: not a checkpoint of an attention ResNet')


def test_a_checkpoint_that_could_run_code_is_refused_with_one_error_line(
        tmp_path):
    from prm_det.engine import TRUST_ENV
    tool = tool_module(ATTENTION)
    src, dst = tmp_path / 'with_args.pth', tmp_path / 'out.pth'
    torch.save(dict(pytorchinsight_checkpoint(official_state_dict('sge', 50)),
                    args=argparse.Namespace(arch='sge_resnet50')), src)
    with pytest.raises(SystemExit) as exit_:
        tool.run(lambda: tool.main([str(src), str(dst)]))
    message = str(exit_.value.code)
    assert message.startswith('[convert] error: ') and TRUST_ENV in message
    assert not dst.exists()


def test_the_se_converter_keeps_its_command_line_and_takes_pytorchinsight(
        tmp_path, capsys):
    tool = tool_module(CONVERTER)
    src, dst = tmp_path / 'se_resnet50.pth.tar', tmp_path / 'out.pth'
    source = official_state_dict('se', 50)
    torch.save(pytorchinsight_checkpoint(source), src)
    result = tool.main([str(src), str(dst), '--source', 'pytorchinsight',
                        '--depth', '50'])
    assert (result.kind, result.source) == ('se', 'pytorchinsight')
    assert 'model.backbone.type=SEResNet' in capsys.readouterr().out
    model = build('se', 50)
    from mmengine.runner import load_checkpoint
    load_checkpoint(model, str(dst), strict=True)
    assert torch.equal(model.layer2[1].se.conv1.conv.bias,
                       source['layer2.1.se.fc.0.bias'])
    # another attention: refused under this name, pointing to the new tool
    torch.save(pytorchinsight_checkpoint(official_state_dict('cbam', 50)),
               src)
    with pytest.raises(tool.ConversionError,
                       match='not an SE-ResNet.*attention2prm_det.py'):
        tool.main([str(src), str(dst)])


@pytest.mark.slow
def test_attention_converter_from_the_users_folder_and_its_printed_override(
        tmp_path, monkeypatch):
    """The CLI as a user runs it (a subprocess in their folder, no
    PYTHONPATH) on an attention-module BAM-ResNet-50 file; then the command
    it prints: the BAM config with its --cfg-options builds a backbone whose
    checked pretrained load takes the file."""
    from mmengine.config import DictAction
    from tool_runs import ok, outside_env, run_tool

    from prm_det.engine import load_config
    src, dst = tmp_path / 'RESNET50_BAM_best.pth.tar', tmp_path / 'bam50.pth'
    source = save_official(src, 'bam', 50, 'attention-module')
    out = ok(run_tool([sys.executable, osp.join(
        REPO, 'tools', 'model_converters', 'attention2prm_det.py'), src.name,
        dst.name], cwd=str(tmp_path), env=outside_env()))
    assert 'pytorchinsight layout, BAM-ResNet-50 -> prm_det BAMResNet' in out
    assert f'saved {dst.name}' in out
    (command, ) = [line.strip() for line in out.splitlines()
                   if line.strip().startswith('python tools/train.py')]
    config, options = command.split()[2], command.split('--cfg-options')[1]
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    cfg_options = parser.parse_args(
        ['--cfg-options'] + options.split()).cfg_options
    assert config == 'configs/retinanet_bam_r50.py'
    monkeypatch.chdir(tmp_path)  # DST as printed: relative to the user's
    cfg = load_config(osp.join(REPO, config), cfg_options)
    assert cfg.model.backbone.init_cfg.allow_partial is False
    backbone = MODELS.build(cfg.model.backbone)
    backbone.init_weights()
    assert torch.equal(
        backbone.bam2.spatial_reduce.conv.weight,
        source['bam2.spatial_att.gate_s.gate_s_conv_reduce0.weight'])
    assert torch.equal(backbone.layer4[2].conv3.weight,
                       source['layer4.2.conv3.weight'])
