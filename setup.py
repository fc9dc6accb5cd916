"""prm_det's wheel carries its configs and tools, as OpenMMLab packages ship
theirs, under ``prm_det/.mim/`` (everything else is in pyproject.toml):

* ``.mim/tools/``: ``tools/``, where ``mim train prm_det CONFIG`` and
  ``mim test prm_det CONFIG --checkpoint CKPT`` run ``train.py``/``test.py``,
* ``.mim/configs/configs/``: ``configs/``, so that a user's config inherits
  ours by its path in this repository, ``_base_ =
  'prm_det::configs/retinanet_prm_r50.py'`` (mmengine reads ``PKG::PATH``
  as ``PKG/.mim/configs/PATH`` and wants a folder in PATH), and mim finds a
  config by its file name,
* ``.mim/model-index.yml``: ``mim list`` lists packages that have one.

An editable install (``pip install -e .``) maps prm_det to this folder and
has no ``.mim/``: use the tools and configs of the checkout there.
"""
import os
import os.path as osp
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = osp.dirname(osp.abspath(__file__))
# repository path -> path under prm_det/.mim/
MIM_FILES = {
    'tools': 'tools',
    'configs': osp.join('configs', 'configs'),
    'model-index.yml': 'model-index.yml',
}


class BuildPyWithMim(build_py):
    """build_py, then the repository's tools, configs and model index
    copied into the built package's ``.mim/``."""

    def run(self):
        super().run()
        if getattr(self, 'editable_mode', False):
            return
        mim = osp.join(self.build_lib, 'prm_det', '.mim')
        shutil.rmtree(mim, ignore_errors=True)
        for source, target in MIM_FILES.items():
            source, target = osp.join(HERE, source), osp.join(mim, target)
            if osp.isdir(source):
                shutil.copytree(source, target, ignore=shutil.ignore_patterns(
                    '__pycache__', '*.pyc'))
            else:
                os.makedirs(osp.dirname(target), exist_ok=True)
                shutil.copyfile(source, target)


setup(cmdclass={'build_py': BuildPyWithMim})
