"""Checkpoints load as data: prm_det's loaders in place of mmengine's, by
one explicit call.

    from prm_det.engine import install_safe_loading
    install_safe_loading()

replaces the loaders of mmengine's ``CheckpointLoader`` for local files and
for ``http(s)://``, ``torchvision://``, ``modelzoo://``, ``open-mmlab://``,
``mmcls://``, ``s3://``, ``petrel://`` and ``pavi://`` with prm_det's
(:mod:`.reading`, :mod:`.remote`):
every checkpoint loads as data (tensors, containers, numbers, the types
mmengine's Runner writes) unless the user trusts it
(``--trust-checkpoint``, ``PRM_DET_TRUST_CHECKPOINTS=1``), published files
are checked against their hash, and ``torchvision://`` needs no torchvision.

Importing prm_det changes none of mmengine's loaders. prm_det's tools call
this first; a config switches it on for any tool that reads it (mmdet's
``tools/train.py`` included) by importing :mod:`prm_det.safe_loading`::

    custom_imports = dict(imports=['prm_det', 'prm_det.safe_loading'],
                          allow_failed_imports=False)

as every config prm_det ships does.
"""
from mmengine.runner.checkpoint import CheckpointLoader

from .reading import load_from_local_file
from .remote import (load_from_ceph, load_from_http, load_from_mmcls,
                     load_from_openmmlab, load_from_pavi,
                     load_from_torchvision_urls)

# mmengine's scheme prefixes (its own loaders' registrations) -> ours
SCHEMES = (
    ('', load_from_local_file),
    (('http://', 'https://'), load_from_http),
    (('torchvision://', 'modelzoo://'), load_from_torchvision_urls),
    (('open-mmlab://', 'openmmlab://'), load_from_openmmlab),
    ('mmcls://', load_from_mmcls),
    ((r'(\S+\:)?s3://', r'(\S+\:)?petrel://'), load_from_ceph),
    ('pavi://', load_from_pavi),
)


def install_safe_loading() -> None:
    """Register prm_det's checkpoint loaders in mmengine's
    ``CheckpointLoader`` for every scheme of :data:`SCHEMES`, replacing
    mmengine's (idempotent)."""
    for prefixes, loader in SCHEMES:
        CheckpointLoader.register_scheme(prefixes, loader, force=True)
