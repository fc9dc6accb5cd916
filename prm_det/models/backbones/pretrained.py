"""Pretrained weights for a backbone, loaded completely or not at all.

mmengine's ``init_cfg=dict(type='Pretrained', ...)`` loads with
``strict=False``: a checkpoint whose keys do not match (an MMPretrain
classifier's ``backbone.`` keys without ``prefix``, another depth, another
attention) loads nothing or part, logs one warning among hundreds of lines
and trains from random weights with exit status 0. prm_det's backbones take
the same ``init_cfg`` and check it: training stops before its first
iteration when the checkpoint leaves any of the backbone's tensors unloaded,
or holds tensors the backbone has no place for, naming how many loaded, a few
of the keys and the likely fix.

``init_cfg`` keys besides mmengine's (``checkpoint``, ``prefix``,
``map_location``):

* ``allow_partial``: ``False`` (default) every tensor must load;
  ``'attention'`` the attention modules' tensors may be missing (they keep
  their initialization: ImageNet ResNet weights into an attention ResNet);
  ``True`` any partial load, reported, for those who mean it.

What loads without options: a plain backbone state dict, a checkpoint of a
whole model under ``state_dict``, a ``DataParallel`` checkpoint (``module.``
keys, the official PRM code's), and an MMPretrain classifier (its backbone's
keys under ``backbone.``, used when no key matches at the top level). A
classification head in the checkpoint (``fc.*``: torchvision's, the
official PRM code's) is not the backbone's and is left out.
"""
import re
from typing import Dict, Iterable, List, Mapping, NamedTuple, Optional, Union

import torch
from mmengine.logging import print_log
from mmengine.model.weight_init import update_init_info
from mmengine.runner import CheckpointLoader
from torch import nn

ALLOW_PARTIAL = (False, 'attention', True)
PRETRAINED_KEYS = ('type', 'checkpoint', 'prefix', 'map_location',
                   'allow_partial')
CLASSIFIER_PREFIX = 'backbone.'
# keys of a classification head saved with a bare backbone (torchvision's
# ResNets, the official PRM code's): not the backbone's, never loaded
HEAD_KEYS = re.compile(r'^fc\.')
SHOWN = 5  # keys listed per kind in a message


class PretrainedLoadIncomplete(RuntimeError):
    """A backbone's ``init_cfg`` checkpoint does not cover the backbone."""


class LoadReport(NamedTuple):
    """How a state dict maps onto a module's tensors."""
    loaded: List[str]
    missing: List[str]  # the module's tensors the checkpoint lacks
    mismatched: List[str]  # present in both with different shapes
    unexpected: List[str]  # in the checkpoint, no place in the module
    optional_missing: List[str]  # missing, but allowed to be

    @property
    def complete(self) -> bool:
        return not (self.missing or self.mismatched or self.unexpected)


def compare_state_dicts(expected: Mapping[str, torch.Size],
                        given: Mapping[str, torch.Tensor],
                        optional: Iterable[str] = ()) -> LoadReport:
    """Which of ``expected`` (a module's tensor names and shapes) ``given``
    fills. ``optional`` names may be missing without counting as missing;
    ``num_batches_tracked`` always may (old checkpoints lack it; mmengine's
    ``load_state_dict`` ignores it too)."""
    optional = set(optional)
    loaded, missing, mismatched, optional_missing = [], [], [], []
    for name, shape in expected.items():
        if name in given:
            (loaded if tuple(given[name].shape) == tuple(shape)
             else mismatched).append(name)
        elif name in optional:
            optional_missing.append(name)
        elif not name.endswith('num_batches_tracked'):
            missing.append(name)
    unexpected = [name for name in given if name not in expected]
    return LoadReport(loaded, missing, mismatched, unexpected,
                      optional_missing)


def backbone_state_dict(checkpoint: Mapping,
                        expected: Iterable[str],
                        prefix: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The tensors of ``checkpoint`` meant for a backbone whose tensor names
    are ``expected``: the ``state_dict`` entry if there is one, ``module.``
    stripped, ``prefix`` selected and stripped (``backbone.`` when no key
    matches at the top level and some do under it: an MMPretrain or mmdet
    model), a classification head (``fc.*``) left out."""
    state = checkpoint.get('state_dict', checkpoint)
    state = {re.sub(r'^module\.', '', key): value
             for key, value in state.items()}
    expected = set(expected)
    if prefix is None and not expected.intersection(state) and any(
            key[len(CLASSIFIER_PREFIX):] in expected for key in state
            if key.startswith(CLASSIFIER_PREFIX)):
        prefix = CLASSIFIER_PREFIX
    if prefix:
        state = {key[len(prefix):]: value for key, value in state.items()
                 if key.startswith(prefix)}
    return {key: value for key, value in state.items()
            if not HEAD_KEYS.match(key) or key in expected}


def incomplete_message(report: LoadReport, checkpoint: str,
                       prefix: Optional[str], top_keys: List[str]) -> str:
    """What went wrong with a load and the likely fix."""
    def some(names):
        shown = ', '.join(names[:SHOWN])
        return shown + (f', ... ({len(names)} in all)'
                        if len(names) > SHOWN else '')

    total = len(report.loaded) + len(report.missing) + len(
        report.mismatched) + len(report.optional_missing)
    lines = [f'init_cfg: the checkpoint {checkpoint} '
             f'(prefix={prefix!r}) fills {len(report.loaded)} of the '
             f"backbone's {total} tensors; training stops before a "
             f'backbone with missing or foreign weights trains from random '
             f'ones.']
    if report.missing:
        lines.append(f'  missing ({len(report.missing)}): '
                     f'{some(report.missing)}')
    if report.mismatched:
        lines.append(f'  shape differs ({len(report.mismatched)}): '
                     f'{some(report.mismatched)}')
    if report.unexpected:
        lines.append(f'  not in the backbone ({len(report.unexpected)}): '
                     f'{some(report.unexpected)}')
    if not report.loaded:
        heads = sorted({key.split('.', 1)[0] + '.' for key in top_keys
                        if '.' in key})
        lines.append(f'  fix: set model.backbone.init_cfg.prefix to the '
                     f"backbone's prefix in that file; its keys start with "
                     f'{", ".join(heads[:SHOWN]) or "nothing"} (an '
                     f"MMPretrain or mmdet model: prefix='backbone.').")
    elif report.mismatched or report.unexpected:
        lines.append('  fix: the checkpoint is of another architecture '
                     '(depth, attention type, stages): use the config '
                     'that matches it.')
    lines.append("  fix: if a partial load is what you mean, set "
                 "model.backbone.init_cfg.allow_partial='attention' (only "
                 "the attention may be missing) or True (anything).")
    return '\n'.join(lines)


def load_pretrained(module: nn.Module, checkpoint: str,
                    prefix: Optional[str] = None, map_location='cpu',
                    allow_partial: Union[bool, str] = False,
                    attention: Iterable[str] = ()) -> LoadReport:
    """Load ``checkpoint`` into ``module`` (a backbone), checked.

    ``attention``: the module's tensor names that
    ``allow_partial='attention'`` lets go missing. Raises
    :class:`PretrainedLoadIncomplete` before changing any weight when the
    load is not complete and ``allow_partial`` does not allow it."""
    if allow_partial not in ALLOW_PARTIAL:
        raise ValueError(f"init_cfg.allow_partial must be one of "
                         f"{ALLOW_PARTIAL}, got {allow_partial!r}")
    raw = CheckpointLoader.load_checkpoint(checkpoint,
                                           map_location=map_location)
    expected = {name: tensor.shape
                for name, tensor in module.state_dict().items()}
    state = backbone_state_dict(raw, expected, prefix)
    optional = attention if allow_partial == 'attention' else ()
    report = compare_state_dicts(expected, state, optional)
    if not report.complete and allow_partial is not True:
        top_keys = list(raw.get('state_dict', raw))
        raise PretrainedLoadIncomplete(
            incomplete_message(report, checkpoint, prefix, top_keys))
    module.load_state_dict({name: state[name] for name in report.loaded},
                           strict=False)
    summary = (f'init_cfg: loaded {len(report.loaded)} tensors of '
               f'{type(module).__name__} from {checkpoint}')
    if report.optional_missing:
        summary += (f'; {len(report.optional_missing)} attention tensors '
                    f'keep their initialization')
    if not report.complete:
        summary += (f'; partial load allowed: {len(report.missing)} '
                    f'missing, {len(report.mismatched)} of another shape, '
                    f'{len(report.unexpected)} not in the backbone')
    print_log(summary, logger='current')
    return report


class CheckedPretrainedMixin:
    """For a backbone (an mmengine ``BaseModule``): an ``init_cfg`` of type
    ``'Pretrained'`` loads through :func:`load_pretrained` after every other
    initialization, as mmengine orders it. The class names its attention
    tensors with ``attention_tensor_names()``."""

    def attention_tensor_names(self) -> List[str]:
        return []

    def init_weights(self) -> None:
        configs = self.init_cfg
        if isinstance(configs, dict):
            configs = [configs]
        pretrained = [dict(cfg) for cfg in configs or []
                      if cfg.get('type') == 'Pretrained']
        if not pretrained:
            return super().init_weights()
        others = [cfg for cfg in configs if cfg.get('type') != 'Pretrained']
        original = self.init_cfg
        self.init_cfg = others or None
        try:
            super().init_weights()
        finally:
            self.init_cfg = original
        for cfg in pretrained:
            extra = sorted(set(cfg) - set(PRETRAINED_KEYS))
            if extra:
                raise ValueError(
                    f"init_cfg of type 'Pretrained' takes "
                    f"{', '.join(PRETRAINED_KEYS[1:])}; it also has "
                    f"{', '.join(extra)}, another initializer's settings "
                    f"(--cfg-options merges into the config's init_cfg). "
                    f"Replace it whole: --cfg-options "
                    f"model.backbone.init_cfg._delete_=True "
                    f"model.backbone.init_cfg.type=Pretrained "
                    f"model.backbone.init_cfg.checkpoint=FILE")
            cfg.pop('type')
            load_pretrained(self, attention=self.attention_tensor_names(),
                            **cfg)
            if hasattr(self, '_params_init_info'):
                update_init_info(
                    self, init_info=f'Pretrained: loaded from '
                    f'{cfg["checkpoint"]} (prm_det, checked)')
