"""The private APIs prm_det leans on (prm_det/private_apis.py), and the
mmengine method AtomicCheckpointHook rewrites, checked against the installed
libraries: an upgrade that moves or changes one fails here, naming the
library, its version and what to look at."""
import hashlib
import inspect
import textwrap

import mmengine
import pytest
import torch
import torch.nn as nn

from prm_det import private_apis


def where(library, version, what):
    return (f'{library} {version}: {what}. Update prm_det/private_apis.py '
            f'(and its callers) for this version.')


def test_torch_private_apis():
    version = torch.__version__
    assert isinstance(nn.BatchNorm2d(2), private_apis.BATCH_NORM_BASE) and \
        isinstance(nn.SyncBatchNorm(2), private_apis.BATCH_NORM_BASE), \
        where('torch', version, 'nn.modules.batchnorm._BatchNorm is no '
              'longer the base of BatchNorm2d and SyncBatchNorm')
    assert hasattr(torch.compiler, '_is_exporting_flag'), where(
        'torch', version, 'torch.compiler._is_exporting_flag is gone')
    assert private_apis.torch_export_in_progress() is False

    conv = nn.Conv2d(1, 1, 1)
    for kind in private_apis.HOOK_KINDS:
        assert hasattr(nn.modules.module, f'_global_{kind}_hooks'), where(
            'torch', version, f'nn.modules.module._global_{kind}_hooks is '
            f'gone')
        assert hasattr(conv, f'_{kind}_hooks'), where(
            'torch', version, f'nn.Module._{kind}_hooks is gone')
    assert not private_apis.hooks_on(conv, *private_apis.HOOK_KINDS)
    handle = conv.register_forward_pre_hook(lambda *_: None)
    assert private_apis.hooks_on(conv, 'forward_pre')
    assert not private_apis.hooks_on(conv, 'forward')
    handle.remove()
    handle = nn.modules.module.register_module_full_backward_hook(
        lambda *_: None)
    try:
        assert private_apis.hooks_on(conv, 'backward'), where(
            'torch', version, 'a global backward hook is not found in '
            'nn.modules.module._global_backward_hooks')
    finally:
        handle.remove()

    bn = nn.BatchNorm2d(3)
    parameters, buffers = private_apis.module_tensors(bn)
    assert parameters['weight'] is bn.weight and \
        buffers['running_var'] is bn.running_var, where(
            'torch', version, 'nn.Module._parameters / _buffers no longer '
            'hold the module\'s tensors')


def test_mmengine_private_apis():
    version = mmengine.__version__
    from mmengine.config import Config
    from mmengine.registry import MODELS
    home = private_apis.mmengine_home()
    assert isinstance(home, str) and home, where(
        'mmengine', version, 'runner.checkpoint._get_mmengine_home changed')
    converted = private_apis.mmcls_to_backbone({'state_dict': {
        'backbone.conv1.weight': torch.ones(1), 'head.fc.weight':
        torch.ones(1)}})
    assert list(converted['state_dict']) == ['conv1.weight'], where(
        'mmengine', version, 'runner.checkpoint._process_mmcls_checkpoint '
        'no longer keeps the backbone\'s weights without their prefix')
    from mmengine.logging import HistoryBuffer

    def prm_det_test_statistic(self):
        return 0

    HistoryBuffer.register_statistics(prm_det_test_statistic)
    try:
        assert 'prm_det_test_statistic' in \
            private_apis.history_buffer_statistics(), where(
                'mmengine', version, 'HistoryBuffer.register_statistics no '
                'longer records in HistoryBuffer._statistics_methods')
    finally:
        HistoryBuffer._statistics_methods.pop('prm_det_test_statistic', None)
    assert private_apis.registry_locations(MODELS) == list(
        MODELS._locations), where('mmengine', version,
                                   'Registry._locations is gone')
    assert private_apis.format_size(4.1e9) == '4.1G', where(
        'mmengine', version, 'analysis.print_helper._format_size changed')
    resolver = private_apis.config_base_resolver()
    assert resolver is not None, where(
        'mmengine', version, 'Config._get_cfg_path (a staticmethod) is gone: '
        'prm_det:: bases from a checkout fall back to mmengine\'s lookup')
    assert list(inspect.signature(resolver).parameters)[:2] == [
        'cfg_path', 'filename'], where(
            'mmengine', version, 'Config._get_cfg_path takes other arguments')
    assert Config._get_cfg_path is resolver


# mmengine 0.10.7's CheckpointHook._save_checkpoint_with_step, which
# AtomicCheckpointHook._save_checkpoint_with_step
# (prm_det/engine/checkpoints/writing.py)
# rewrites with the same bookkeeping
SAVE_WITH_STEP_SHA256 = (
    '9b971b6cd3cc507da3041d5432ba5766d048eeebcf8b365df4417729c92d4763')


def test_the_mmengine_method_the_checkpoint_hook_rewrites_is_unchanged():
    from mmengine.hooks import CheckpointHook
    source = textwrap.dedent(
        inspect.getsource(CheckpointHook._save_checkpoint_with_step))
    assert hashlib.sha256(source.encode()).hexdigest() == \
        SAVE_WITH_STEP_SHA256, (
            f'mmengine {mmengine.__version__} changed '
            f'CheckpointHook._save_checkpoint_with_step, which prm_det.'
            f'engine.checkpoints.writing.AtomicCheckpointHook rewrites: compare '
            f'the two, carry the change over, then update '
            f'SAVE_WITH_STEP_SHA256 here. mmengine\'s method now:\n{source}')


def test_triton_interpreter_internals_the_tests_speed_up():
    """tests/conftest.py patches each interpreted function's modules once
    (test speed); it steps aside when Triton moves them, which this
    names."""
    triton = pytest.importorskip('triton')
    from triton.runtime import interpreter
    assert hasattr(interpreter, '_patch_lang') and hasattr(
        interpreter.InterpretedFunction, 'rewrite'), (
            f'triton {triton.__version__}: runtime.interpreter._patch_lang '
            f'or InterpretedFunction.rewrite is gone; tests/conftest.py\'s '
            f'speed-up no longer applies (the suite is slower, not wrong)')
