"""Running tools/ as a user does, on a tiny generated dataset: shared by the
end-to-end tests of tests/test_tools/."""
import os
import re
import socket
import subprocess

import torch
# the tests import these from here too
from helpers import (CASCADE, REPO, RETINA, ok, tiny_options,  # noqa: F401
                     tool_module)

def tool_env(**extra):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS='2')
    env.update(extra)
    return env


def outside_env(**extra):
    """A user's environment: no PYTHONPATH (the tools put their checkout's
    prm_det first themselves)."""
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    env['OMP_NUM_THREADS'] = '2'
    env.update(extra)
    return env


def run_tool(args, cwd=REPO, timeout=300, env=None):
    return subprocess.run(args, cwd=cwd, env=env or tool_env(),
                          capture_output=True, text=True, timeout=timeout)


def checkpoint_meta(path):
    return torch.load(path, map_location='cpu', weights_only=False)['meta']


def parse_ap_table(output):
    match = re.search(r'\| AP \| AP50 \| AP75 \| APs \| APm \| APl \|\n'
                      r'\|(?:---\|){6}\n\|((?: (?:[\d.]+|n/a) \|){6})', output)
    assert match, output[-2000:]
    return [float(v) if v.strip() != 'n/a' else None
            for v in match.group(1).split('|') if v.strip()]


def short_epochs(data_root, epochs):
    """Two of the images in one batch: an epoch is one short iteration and
    a checkpoint (max_keep_ckpts=1, as in the issue); no validation."""
    return tiny_options(data_root, epochs) + [
        'train_dataloader.dataset.indices=2',
        'default_hooks.checkpoint.max_keep_ckpts=1', 'val_cfg=None',
        'val_dataloader=None', 'val_evaluator=None']


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]
