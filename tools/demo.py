"""The demo: train PRM-RetinaNet on generated shapes, then report COCO AP.

    python tools/demo.py [ARGS of tools/train.py]      # a checkout (make demo)
    python .../site-packages/prm_det/.mim/tools/demo.py  # installed prm_det

1. writes the shapes dataset to data/prm_demo/ (once; kept afterwards),
2. trains configs/demo/retinanet_prm_r18_shapes.py with tools/train.py
   (mmengine's Runner, its progress log every 10 iterations),
3. evaluates the last checkpoint on the val split with tools/test.py
   (mmdet's CocoMetric / pycocotools) and prints the AP table.

Extra arguments go to tools/train.py, e.g. --cfg-options train_cfg.max_epochs=2
(--cfg-options also to tools/test.py). Data and work dir are under the
working directory, where the demo config's data_root points.
"""
import os.path as osp
import sys
import time

here = osp.dirname(osp.abspath(__file__))
ROOT = osp.dirname(here)
# run from a checkout: its prm_det first (installed, the tools sit in
# prm_det/.mim/tools/ and import the installed package)
if osp.isdir(osp.join(ROOT, 'prm_det')):
    sys.path.insert(0, ROOT)


from prm_det.datasets.synthetic_shapes import (  # noqa: E402
    DEMO_NUM_TRAIN, DEMO_NUM_VAL, generate, is_generated, split_sizes)
from prm_det.engine import load_tool  # noqa: E402

# this folder's train.py and test.py (the checkout's, or the installed ones)
train_tool = load_tool(osp.join(here, 'train.py'))
test_tool = load_tool(osp.join(here, 'test.py'))


def _shown(path: str) -> str:
    """``path`` relative to the working directory when it is under it."""
    relative = osp.relpath(path)
    return path if relative.startswith('..') else relative


# the checkout's configs/ (installed: prm_det/.mim/configs/configs/, setup.py)
CONFIGS = next(p for p in (osp.join(ROOT, 'configs', 'configs'),
                           osp.join(ROOT, 'configs')) if osp.isdir(p))
CONFIG = _shown(osp.join(CONFIGS, 'demo', 'retinanet_prm_r18_shapes.py'))
VIS_PRM = _shown(osp.join(here, 'analysis_tools', 'vis_prm.py'))
# in the working directory, where the config's data_root points
DATA_ROOT = 'data/prm_demo'
WORK_DIR = 'work_dirs/demo'


def _cfg_options(argv):
    """``--cfg-options k=v ...`` of ``argv`` (they apply to the test too)."""
    if '--cfg-options' not in argv:
        return []
    start = argv.index('--cfg-options')
    options = []
    for arg in argv[start + 1:]:
        if arg.startswith('--'):
            break
        options.append(arg)
    return ['--cfg-options'] + options


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    start = time.time()
    if not is_generated(DATA_ROOT):
        print(f'[demo] writing the shapes dataset to {DATA_ROOT}/', flush=True)
        generate(DATA_ROOT)
    sizes = split_sizes(DATA_ROOT)
    print(f'[demo] data: {DATA_ROOT}/, {sizes["train"]} train and '
          f'{sizes["val"]} val images', flush=True)
    if (sizes['train'], sizes['val']) != (DEMO_NUM_TRAIN, DEMO_NUM_VAL):
        # `make` only where the tool sits in a checkout (not prm_det/.mim/)
        remove = (f'`make clean-demo` (or removing {DATA_ROOT}/)'
                  if osp.isfile(osp.join(ROOT, 'Makefile')) else
                  f'removing {DATA_ROOT}/')
        print(f'[demo] warning: the demo\'s numbers are for {DEMO_NUM_TRAIN} '
              f'train and {DEMO_NUM_VAL} val images; {remove} writes them on '
              f'the next run', flush=True)
    print(f'[demo] training {CONFIG} (work dir {WORK_DIR})', flush=True)
    train_tool.main([CONFIG, '--work-dir', WORK_DIR] + argv)
    with open(osp.join(WORK_DIR, 'last_checkpoint')) as f:
        checkpoint = f.read().strip()
    train_time = time.time() - start
    print(f'[demo] evaluating {checkpoint} on the val split', flush=True)
    metrics = test_tool.main([CONFIG, checkpoint, '--work-dir', WORK_DIR] +
                             _cfg_options(argv))
    if not metrics:
        return
    print(f'\n[demo] PRM-RetinaNet (ResNet-18 PRM, from scratch) on generated '
          f'shapes: box AP {100 * metrics["coco/bbox_mAP"]:.1f}, '
          f'train {train_time / 60:.1f} min, total '
          f'{(time.time() - start) / 60:.1f} min', flush=True)
    python = osp.relpath(sys.executable) if osp.abspath(
        sys.executable).startswith(osp.abspath('.') + osp.sep) else 'python'
    print(f'[demo] to draw what PRM attends to (query points, position '
          f'weights, gates): {python} {VIS_PRM} '
          f'{CONFIG} {checkpoint} {DATA_ROOT}/val/000000.png --out-dir '
          f'{WORK_DIR}/vis_prm', flush=True)


if __name__ == '__main__':
    main()
