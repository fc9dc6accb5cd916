"""Every model prm_det registers builds from mmdet's ``MODELS`` and from its
class, whatever default scope is current (none, mmdet's, mmengine's), as
mmcv's ContextBlock does: in a fresh process that has not called
``register_all_modules()`` (the suite's conftest has, so the builds run in
a subprocess)."""
import json
import os
import subprocess
import sys

from helpers import REPO

SCRIPT = r"""
import json

import torch
from mmdet.models.backbones import MobileNetV2, ResNet
from mmdet.registry import MODELS
from mmengine.registry import DefaultScope

import prm_det
from prm_det.models.backbones.mnasnet import MnasNet

ours = {name: cls for name, cls in MODELS.module_dict.items()
        if cls.__module__.startswith('prm_det.')}
configs = []
for name, cls in sorted(ours.items()):
    if issubclass(cls, ResNet):
        configs.append((name, dict(type=name, depth=18)))
    elif issubclass(cls, (MobileNetV2, MnasNet)):
        configs.append((name, dict(type=name)))
    else:
        configs.append((name, dict(type=name, in_channels=64)))
        configs.append((f'ResNet + {name} plugin', dict(
            type='mmdet.ResNet', depth=50,
            plugins=[dict(cfg=dict(type=name), position='after_conv3')])))
# mmdet's ResNet by its scoped name: under mmengine's scope it is not found
# otherwise (it is mmdet's, not ours)
configs.append(('ResNet + ContextBlock plugin', dict(
    type='mmdet.ResNet', depth=50, plugins=[dict(
        cfg=dict(type='ContextBlock', ratio=1. / 16),
        position='after_conv3')])))


def build(how, cfg):
    if how == 'class':
        args = dict(cfg)
        return ours[args.pop('type')](**args)
    return MODELS.build(cfg)


def runs(module, cfg):
    x = torch.rand(1, 64 if 'in_channels' in cfg else 3, 32, 32)
    module.eval()
    with torch.no_grad():
        out = module(x)
    outs = out if isinstance(out, tuple) else (out, )
    return all(torch.isfinite(o).all() for o in outs)


results = {}
for scope in (None, 'mmdet', 'mmengine'):
    for how in ('MODELS.build', 'class'):
        for name, cfg in configs:
            if how == 'class' and cfg['type'] not in ours:
                continue
            key = f'{name} | {how} | scope {scope}'
            try:
                if scope is None:
                    assert DefaultScope.get_current_instance() is None
                    module = build(how, cfg)
                else:
                    with DefaultScope.overwrite_default_scope(scope):
                        module = build(how, cfg)
                results[key] = 'ok' if runs(module, cfg) else 'no'
            except Exception as error:
                results[key] = f'{type(error).__name__}: {error}'
print('RESULTS ' + json.dumps(dict(ours=sorted(ours), results=results,
                                  prm_det=prm_det.__file__)))
"""


def test_every_registered_model_builds_whatever_scope_is_current(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)  # this checkout's prm_det
    proc = subprocess.run([sys.executable, '-c', SCRIPT], cwd=tmp_path,
                          env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith('RESULTS ')]
    report = json.loads(line[-1][len('RESULTS '):])
    assert set(report['ours']) >= {'PRM', 'SE', 'AttentionResNet',
                                   'PRMResNet', 'SEResNet', 'GCResNet'}
    assert report['prm_det'].startswith(REPO)
    results = report['results']
    failed = {k: v for k, v in results.items() if v != 'ok'}
    assert failed == {}
    for scope in ('None', 'mmdet', 'mmengine'):
        for name in report['ours']:
            assert results[f'{name} | MODELS.build | scope {scope}'] == 'ok'
            assert results[f'{name} | class | scope {scope}'] == 'ok'
        for plugin in ('PRM', 'SE', 'ContextBlock'):
            assert results[f'ResNet + {plugin} plugin | MODELS.build | '
                           f'scope {scope}'] == 'ok'
