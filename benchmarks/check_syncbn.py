"""SyncBN with PRM-ResNet on CUDA, two processes: PRM takes its unfused path
and the BatchNorm statistics and gradients are the whole batch's.

    torchrun --nproc_per_node 2 benchmarks/check_syncbn.py [--out FILE.md]

Each rank trains one step of the same PRM-ResNet-50 (stages 1-2,
``norm_cfg=dict(type='SyncBN')``, under DistributedDataParallel) on its
half of one batch. Rank 0 also runs one process's step over the whole
batch with plain BatchNorm (mmengine's ``revert_sync_batchnorm``) from the
same weights. Checked: every PRM block ran its last norm as a module (the
unfused path: PRM's fused op would normalize with one rank's statistics);
each norm's running mean and variance are equal on both ranks and equal to
the whole-batch step's; every gradient equals the whole-batch step's. Where
the ranks share one GPU (a machine with one) they talk through gloo, which
SyncBN supports (nccl refuses two ranks on one device). Exits 1 when a check
fails; the table goes to stdout and ``--out``.
"""
import argparse
import copy
import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import prm_det  # noqa: E402,F401
from mmdet.registry import MODELS  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.model import revert_sync_batchnorm  # noqa: E402

IMAGES_PER_RANK = 2
SIZE = 128
TOLERANCE = 1e-3  # relative, float32 sums over a different order


def build(norm_cfg):
    torch.manual_seed(0)
    return MODELS.build(dict(type='PRMResNet', depth=50, num_stages=2,
                             strides=(1, 2), dilations=(1, 1),
                             out_indices=(0, 1), norm_cfg=norm_cfg,
                             norm_eval=False,  # mmdet's default freezes them
                             init_cfg=None))


def step(model, images):
    outs = model(images)
    sum(o.float().square().mean() for o in outs).backward()


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out')
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit('check_syncbn needs CUDA (SyncBN refuses CPU '
                         'tensors in a process group)')
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    device = torch.device('cuda', local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    shared_gpu = int(os.environ.get('LOCAL_WORLD_SIZE', 1)) > \
        torch.cuda.device_count()
    backend = 'gloo' if shared_gpu else 'nccl'
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    register_all_modules()

    model = build(dict(type='SyncBN')).to(device)
    model.train()  # mmdet's ResNet.train returns None
    whole = revert_sync_batchnorm(copy.deepcopy(model))
    prm_blocks = [m for m in model.modules() if hasattr(m, 'prm')]
    unfused = []
    for block in prm_blocks:  # a counting forward, not a hook: a hooked
        forward = block.norm3.forward  # norm is never fused

        def counted(x, forward=forward):
            unfused.append(1)
            return forward(x)

        block.norm3.forward = counted
    ddp = DistributedDataParallel(model, device_ids=[device.index])

    generator = torch.Generator().manual_seed(1)
    images = torch.rand(world * IMAGES_PER_RANK, 3, SIZE, SIZE,
                        generator=generator).to(device)
    mine = images[rank * IMAGES_PER_RANK:(rank + 1) * IMAGES_PER_RANK]
    step(ddp, mine)
    torch.cuda.synchronize()

    norms = [(n, m) for n, m in model.named_modules()
             if isinstance(m, torch.nn.SyncBatchNorm)]
    stats = torch.cat([torch.cat([m.running_mean, m.running_var])
                       for _, m in norms])
    gathered = [torch.empty_like(stats) for _ in range(world)]
    dist.all_gather(gathered, stats)
    across_ranks = max((g - stats).abs().max().item() for g in gathered)

    failures = []
    if len(unfused) != len(prm_blocks):
        failures.append(f'PRM blocks that ran the norm as a module: '
                        f'{len(unfused)} of {len(prm_blocks)}')
    if across_ranks != 0:
        failures.append(f'running statistics differ across ranks by '
                        f'{across_ranks:.3g}')
    if rank == 0:
        step(whole, images)
        named = dict(whole.named_modules())
        stat_err = max(max(rel(m.running_mean, named[n].running_mean),
                           rel(m.running_var, named[n].running_var))
                       for n, m in norms)
        whole_params = dict(whole.named_parameters())
        grad_err = max(rel(p.grad, whole_params[n].grad)
                       for n, p in model.named_parameters()
                       if p.grad is not None)
        if stat_err > TOLERANCE:
            failures.append(f'running statistics off the whole batch\'s by '
                            f'{stat_err:.3g} (relative)')
        if grad_err > TOLERANCE:
            failures.append(f'gradients off the whole batch\'s by '
                            f'{grad_err:.3g} (relative)')
        table = '\n'.join([
            '| ranks | backend | GPUs | SyncBN layers | PRM blocks unfused '
            '| stats: across ranks | stats vs whole batch (rel) '
            '| grads vs whole batch (rel) | result |',
            '|---|---|---|---|---|---|---|---|---|',
            f'| {world} | {backend} | {torch.cuda.device_count()} x '
            f'{torch.cuda.get_device_name(device)} | {len(norms)} | '
            f'{len(unfused)} of {len(prm_blocks)} | {across_ranks:.1e} | '
            f'{stat_err:.1e} | {grad_err:.1e} | '
            f'{"ok" if not failures else "FAILED: " + "; ".join(failures)} |'])
        print(table, flush=True)
        if args.out:
            with open(args.out, 'w') as f:
                f.write('SyncBN with PRM-ResNet-50 (stages 1-2), '
                        f'{IMAGES_PER_RANK} images of {SIZE} px per rank, '
                        f'torch {torch.__version__}\n\n{table}\n')
    verdict = torch.tensor([len(failures)], device=device)
    dist.all_reduce(verdict)
    dist.destroy_process_group()
    if verdict.item():
        sys.exit(1)


if __name__ == '__main__':
    main()
