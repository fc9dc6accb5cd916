"""One factory from a short name or a config dict to an attention module."""
from typing import Optional, Union

from mmcv.cnn import ContextBlock, NonLocal2d  # noqa: F401  (registers them)
from mmdet.registry import MODELS
from torch import nn

# Short names and their defaults. GC is mmcv's ContextBlock as GCNet uses it
# (ratio 1/16, attention pooling, channel_add fusion), its last conv kept
# zero-initialized in a backbone (layers/gc.py).
ATTENTION_TYPES = {
    'prm': dict(type='PRM'),
    'se': dict(type='SE'),
    'gc': dict(type='GC'),
    'ge': dict(type='GE'),
    'sge': dict(type='SGE'),
    'cbam': dict(type='CBAM'),
    'bam': dict(type='BAM'),
}

AttentionSpec = Optional[Union[str, dict]]


def attention_cfg(attention: AttentionSpec,
                  default: AttentionSpec = None) -> Optional[dict]:
    """Resolve ``attention`` to a config dict (without ``in_channels``).

    ``attention`` is a short name (``ATTENTION_TYPES``), a config dict, or None
    for ``default``. A dict without ``type`` updates the default's options,
    e.g. ``dict(groups=32)`` for a PRM backbone.
    """
    def resolve(spec):
        if spec is None:
            return None
        if isinstance(spec, str):
            if spec.lower() not in ATTENTION_TYPES:
                raise ValueError(
                    f'attention must be one of {sorted(ATTENTION_TYPES)} or a '
                    f'config dict, got {spec!r}')
            return dict(ATTENTION_TYPES[spec.lower()])
        if isinstance(spec, dict):
            return dict(spec)
        raise ValueError(f'attention must be a name or a dict, got {spec!r}')

    base = resolve(default)
    cfg = resolve(attention)
    if cfg is None:
        return base
    if 'type' not in cfg:
        if base is None:
            raise ValueError(f'attention config {cfg} has no type and there '
                             f'is no default attention to update')
        return {**base, **cfg}
    return cfg


def build_attention(attention: AttentionSpec,
                    in_channels: int) -> Optional[nn.Module]:
    """Build an attention module for ``in_channels`` channels, or None."""
    cfg = attention_cfg(attention)
    if cfg is None:
        return None
    return MODELS.build(dict(cfg, in_channels=in_channels))
