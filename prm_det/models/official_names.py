"""The official code's parameter names and prm_det's.

PytorchInsight's and attention-module's ResNets name the stem, the blocks
and the downsample as torchvision does, and so does mmdet's ``ResNet``
(``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.bn1``,
``layer1.0.downsample.0``...): only the attention modules' inner names
differ, and each module class lists its own (``OFFICIAL_NAMES``: an official
name fragment -> ours). SGE's names (``sge.weight``, ``sge.bias``) and BAM's
attribute names (``bam1``-``bam3``) are the official ones.
"""
from typing import Dict

from .layers import BAM, CBAM, SelectiveKernel

OFFICIAL_NAMES: Dict[str, Dict[str, str]] = {
    'cbam': CBAM.OFFICIAL_NAMES,
    'bam': BAM.OFFICIAL_NAMES,
    'sk': SelectiveKernel.OFFICIAL_NAMES,
    'sge': {},
    'ge': {},
}


def rename_official(key: str, names: Dict[str, str]) -> str:
    """``key`` with the first official fragment of ``names`` that starts
    one of its dotted segments replaced by ours (``key`` unchanged when
    none does): ``layer1.0.cbam.ChannelGate.mlp.1.weight`` ->
    ``layer1.0.cbam.channel_fc1.weight``."""
    for official, ours in names.items():
        at = key.find(official)
        while at >= 0:
            if at == 0 or key[at - 1] == '.':
                return key[:at] + ours + key[at + len(official):]
            at = key.find(official, at + 1)
    return key
