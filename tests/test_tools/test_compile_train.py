"""mmengine's ``compile`` option with a PRM detector: tools/train.py run as a
user runs it, from the user's folder, with ``--cfg-options compile...``."""
import os.path as osp
import re
import sys

import pytest
from tool_runs import REPO, RETINA, ok, outside_env, run_tool, tiny_options

pytestmark = pytest.mark.slow


def test_a_compiled_train_step_of_the_demo_detector_runs_prm_in_its_graphs(
        tiny_data, tmp_path):
    """One iteration with the Runner's ``compile`` (mmengine wraps the
    model's train_step in torch.compile). AOT autograd with fake tensors
    (``aot_eager``) stands in for Inductor here to keep the test short:
    Inductor took 8.5 min for this on a 2-core CPU. Dynamo's graph log
    shows PRM's custom op inside the compiled backbone graph, not run
    between graph breaks."""
    work = str(tmp_path / 'work')
    env = outside_env(TORCH_LOGS='graph_code')
    out = ok(run_tool(
        [sys.executable, osp.join(REPO, 'tools', 'train.py'),
         osp.join(REPO, RETINA), '--work-dir', work] +
        tiny_options(tiny_data) + [
            'compile.backend=aot_eager', 'train_dataloader.dataset.indices=2',
            'val_cfg=None', 'val_dataloader=None', 'val_evaluator=None'],
        cwd=str(tmp_path), env=env, timeout=600))
    assert 'Model has been "compiled"' in out
    losses = re.findall(r'Epoch\(train\) \[1\]\[1/1\].* loss: ([\d.]+)', out)
    assert losses and float(losses[0]) > 0, out[-3000:]
    assert 'torch.ops.prm_det.block_tail(' in out
