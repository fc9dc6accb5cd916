"""Draw what PRM attends to on an image: the PRM paper's figure of query
points, positional masks and attention, for a trained detector; and the
spatial attention maps of SGE and CBAM backbones.

    python tools/analysis_tools/vis_prm.py CONFIG CHECKPOINT IMAGE
        --out-dir DIR [--blocks layer1.2 layer4.2 ...] [--device cpu]
        [--trust-checkpoint] [--cfg-options k=v ...]

For each chosen block (default: the last block of every stage that has a
PRM) it writes, each the image's size pixel for pixel under a title (and
a colour bar for the maps):

* ``<block>_queries.png``: the query point each group picked (the argmax of
  the group's channel sum), drawn on the image ('xN' where N groups picked
  the same position; the title counts queries and positions);
* ``<block>_position_weight.png``: D, the Gaussian of the distance to the
  group's query point, averaged over the groups;
* ``<block>_gate.png``: the gate sigmoid(lambda * N(S) + xi), averaged over
  the groups (what multiplies the features);

and ``grid.png``, one row per block. The PRM input is taken with a forward
pre-hook on the block's ``prm`` module during mmdet's inference; the maps are
computed from it by :mod:`prm_det.ops.reference` itself (the reference
returns its intermediates).

SGE and CBAM blocks (``SGEResNet``, ``CBAMResNet``: the block's ``sge`` or
``cbam`` module) get ``<block>_gate.png`` alone: SGE's gate
sigmoid(weight * N(S) + bias) averaged over its groups, CBAM's spatial gate
(after its channel gate), each computed by the module's own functions
(:func:`prm_det.models.layers.sge.sge_gate`, ``CBAM.spatial_gate``); their
grid rows show the image, no query points and no D.
"""
import argparse
import os
import os.path as osp
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

# run from a checkout: its prm_det first (installed, the tools sit in
# prm_det/.mim/tools/ and import the installed package)
_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if osp.isdir(osp.join(_ROOT, 'prm_det')):
    sys.path.insert(0, _ROOT)

import prm_det  # noqa: E402,F401  (registers the backbones)
from prm_det.models.layers import CBAM, PRM, SGE  # noqa: E402
from prm_det.models.layers.sge import sge_gate  # noqa: E402
from prm_det.ops import PRMParams, prm_reference_of  # noqa: E402

# the block attributes whose modules have maps to draw, in the order looked up
SPATIAL_ATTENTION = ('prm', 'sge', 'cbam')

QUERY_COLOR = (255, 0, 0)  # RGB, with a white ring: visible on red too
RING_COLOR = (255, 255, 255)


def prm_maps(x: Tensor, prm: nn.Module) -> Dict[str, Tensor]:
    """Query positions, position weight D and gate of one PRM on its input,
    as the reference computes them
    (:func:`prm_det.ops.reference.prm_reference_with_intermediates`).

    Args:
        x (Tensor): the PRM's input, [1, c, h, w].
        prm (nn.Module): the PRM module (its parameters and options).

    Returns:
        dict: ``query_index`` [g] (flat index row * w + col), ``query_rc``
        [g, 2] (row, col), ``position_weight`` and ``gate`` [g, h, w].
    """
    params = PRMParams(*(getattr(prm, name) for name in PRMParams._fields))
    _, parts = prm_reference_of(x, params, prm.options, intermediates=True)
    return dict(query_index=parts.query_index[0],
                query_rc=parts.query_rc[0],
                position_weight=parts.position_weight[0],
                gate=parts.gate[0])


def gate_maps(x: Tensor, module: nn.Module) -> Dict[str, Tensor]:
    """The gate of an SGE or CBAM module on its input ``x`` [1, c, h, w]:
    ``gate`` [g, h, w] (SGE: one map a group; CBAM: its one spatial map)."""
    if isinstance(module, SGE):
        return dict(gate=sge_gate(x, module.weight, module.bias,
                                  module.groups)[0])
    if isinstance(module, CBAM):
        gated = x * module.channel_gate(x)[:, :, None, None]
        return dict(gate=module.spatial_gate(gated)[0])
    raise TypeError(f'no maps to draw for {type(module).__name__}')


def attention_of(block: nn.Module) -> Optional[str]:
    """The attribute of ``block``'s spatial attention module, or None."""
    for name in SPATIAL_ATTENTION:
        if isinstance(getattr(block, name, None), (PRM, SGE, CBAM)):
            return name
    return None


def default_blocks(backbone: nn.Module) -> List[str]:
    """The last block with a PRM (or SGE, CBAM) of every stage, e.g.
    ['layer1.2', ...]."""
    blocks = []
    for layer_name in backbone.res_layers:
        layer = getattr(backbone, layer_name)
        with_maps = [i for i, block in enumerate(layer)
                     if attention_of(block) is not None]
        if with_maps:
            blocks.append(f'{layer_name}.{with_maps[-1]}')
    if not blocks:
        raise ValueError('the backbone has no PRM, SGE or CBAM module (no '
                         'block has a `prm`, `sge` or `cbam` attribute): use '
                         'a PRMResNet, SGEResNet or CBAMResNet config')
    return blocks


def capture_prm_inputs(backbone: nn.Module, blocks: Sequence[str]):
    """Forward pre-hooks on each block's PRM (or SGE, CBAM); returns
    (captured inputs by block, handles, attention modules by block)."""
    modules = dict(backbone.named_modules())
    captured, handles, attention = {}, [], {}
    for block in blocks:
        name = attention_of(modules[block]) if block in modules else None
        if name is None:
            with_maps = sorted(
                b for b, m in modules.items() if b.count('.') == 1
                and b.startswith('layer') and attention_of(m) is not None)
            raise ValueError(
                f'no PRM, SGE or CBAM at backbone.{block}; blocks with '
                f'one: {with_maps}')
        attention[block] = getattr(modules[block], name)

        def hook(module, inputs, block=block):
            captured[block] = inputs[0].detach()
        handles.append(attention[block].register_forward_pre_hook(hook))
    return captured, handles, attention


def to_image(feature_map: np.ndarray, meta: dict,
             image_hw: Sequence[int]) -> np.ndarray:
    """A [h, w] map over the network input, as a map over the original
    image: stretched to the padded input, cropped to the resized image,
    resized to the original size (nearest: one cell stays one block)."""
    import cv2
    input_h, input_w = meta['batch_input_shape']
    resized_h, resized_w = meta['img_shape']
    full = cv2.resize(feature_map.astype(np.float32), (input_w, input_h),
                      interpolation=cv2.INTER_NEAREST)
    valid = full[:resized_h, :resized_w]
    return cv2.resize(valid, (image_hw[1], image_hw[0]),
                      interpolation=cv2.INTER_NEAREST)


def query_points_xy(query_rc: np.ndarray, feature_hw: Sequence[int],
                    meta: dict) -> np.ndarray:
    """(x, y) in original image pixels of each query cell's center."""
    input_h, input_w = meta['batch_input_shape']
    scale_w, scale_h = meta['scale_factor']
    stride_y, stride_x = input_h / feature_hw[0], input_w / feature_hw[1]
    x = (query_rc[:, 1] + 0.5) * stride_x / scale_w
    y = (query_rc[:, 0] + 0.5) * stride_y / scale_h
    return np.stack([x, y], 1)


def query_pixels(points_xy: np.ndarray, image_hw: Sequence[int]
                 ) -> Dict[tuple, int]:
    """Each pixel a query point is drawn at (clipped to the image: a query
    may sit in the padding), with the number of groups whose query is
    there: groups often pick the same position."""
    height, width = image_hw[:2]
    counts: Dict[tuple, int] = {}
    for x, y in points_xy:
        center = (min(max(int(x), 0), width - 1),
                  min(max(int(y), 0), height - 1))
        counts[center] = counts.get(center, 0) + 1
    return counts


def describe_queries(points_xy: np.ndarray, image_hw: Sequence[int]) -> str:
    """'16 queries at 9 positions' (or 'at their own positions')."""
    positions = len(query_pixels(points_xy, image_hw))
    where = ('each at its own position' if positions == len(points_xy) else
             f'at {positions} positions (xN: N groups share one)')
    return f'{len(points_xy)} queries {where}'


def draw_queries(image_rgb: np.ndarray, points_xy: np.ndarray) -> np.ndarray:
    """The image with a ringed dot at each query point and, where N groups
    picked the same position, 'xN' beside its dot."""
    import cv2
    canvas = np.ascontiguousarray(image_rgb.copy())
    height, width = canvas.shape[:2]
    radius = max(2, round(min(height, width) / 80))
    counts = query_pixels(points_xy, canvas.shape)
    for center in counts:  # rings first: a dot is never painted over
        cv2.circle(canvas, center, radius + 1, RING_COLOR, -1)
    for center in counts:
        cv2.circle(canvas, center, radius, QUERY_COLOR, -1)
    scale = max(0.3, min(height, width) / 400)
    for (x, y), count in counts.items():
        if count > 1:
            origin = (min(x + radius + 2, width - 1), max(y - radius, 8))
            for color, thickness in ((RING_COLOR, 3), (QUERY_COLOR, 1)):
                cv2.putText(canvas, f'x{count}', origin,
                            cv2.FONT_HERSHEY_SIMPLEX, scale, color, thickness,
                            cv2.LINE_AA)
    return canvas


# A per-block PNG: a title band of TITLE_PX rows, then the picture pixel for
# pixel (rows TITLE_PX.., columns 0..width-1) and, for a map, its colour bar
# in BAR_PX more columns on the right.
TITLE_PX, BAR_PX, PANEL_DPI = 24, 64, 100


def save_panel(path: str, picture: np.ndarray, title: str,
               cmap: str = 'viridis') -> None:
    """Write ``picture`` (an RGB image, or a [h, w] map drawn with ``cmap``
    and a colour bar of its values) under ``title``."""
    import matplotlib.pyplot as plt
    from matplotlib import cm, colors
    height, width = picture.shape[:2]
    is_map = picture.ndim == 2
    bar = BAR_PX if is_map else 0
    fig = plt.figure(figsize=((width + bar) / PANEL_DPI,
                              (height + TITLE_PX) / PANEL_DPI),
                     dpi=PANEL_DPI, facecolor='white')
    if is_map:
        low, high = float(picture.min()), float(picture.max())
        mappable = cm.ScalarMappable(
            norm=colors.Normalize(low, high if high > low else low + 1e-6),
            cmap=cmap)
        fig.figimage(mappable.to_rgba(picture, bytes=True), xo=0, yo=0,
                     origin='upper')
        total_w, total_h = width + bar, height + TITLE_PX
        bar_axes = fig.add_axes([(width + 4) / total_w, 4 / total_h,
                                 10 / total_w, (height - 8) / total_h])
        fig.colorbar(mappable, cax=bar_axes)
        bar_axes.tick_params(labelsize=6)
    else:
        fig.figimage(picture, xo=0, yo=0, origin='upper')
    # one line in the band (cut at the right edge on a narrow image)
    fig.text(2 / (width + bar), 1 - 4 / (height + TITLE_PX), title,
             va='top', ha='left', fontsize=6)
    fig.savefig(path, dpi=PANEL_DPI, facecolor='white')
    plt.close(fig)


def visualize(model: nn.Module, image_path: str, out_dir: str,
              blocks: Optional[Sequence[str]] = None) -> List[dict]:
    """Run ``model`` on the image and write the pictures; returns, per
    block, the arrays drawn (``features`` is the PRM input)."""
    import matplotlib
    matplotlib.use('Agg')
    import mmcv
    from mmdet.apis import inference_detector

    backbone = model.backbone
    blocks = list(blocks or default_blocks(backbone))
    image_rgb = mmcv.imread(image_path, channel_order='rgb')
    captured, handles, attention = capture_prm_inputs(backbone, blocks)
    try:
        result = inference_detector(model, image_path)
    finally:
        for handle in handles:
            handle.remove()
    missing = [b for b in blocks if b not in captured]
    if missing:
        raise RuntimeError(
            f'the attention modules of {missing} were never called during '
            f'the forward pass (the block ran a fused path that bypasses the '
            f'module, so its forward pre-hook did not fire)')
    meta = result.metainfo
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for block in blocks:
        x = captured[block].float()
        module = attention[block]
        name = block.replace('.', '_')
        if not isinstance(module, PRM):
            rows.append(_gate_row(block, name, x, module, image_rgb, meta,
                                  out_dir))
            continue
        with torch.no_grad():
            maps = prm_maps(x, module)
        feature_hw = x.shape[2:]
        points = query_points_xy(maps['query_rc'].numpy(), feature_hw, meta)
        row = dict(block=block, kind='PRM', features=x[0].numpy(),
                   query_index=maps['query_index'].numpy(),
                   query_rc=maps['query_rc'].numpy(), query_xy=points,
                   position_weight_groups=maps['position_weight'].numpy(),
                   gate_groups=maps['gate'].numpy())
        row['position_weight'] = row['position_weight_groups'].mean(0)
        row['gate'] = row['gate_groups'].mean(0)
        row['files'] = dict(
            queries=osp.join(out_dir, f'{name}_queries.png'),
            position_weight=osp.join(out_dir, f'{name}_position_weight.png'),
            gate=osp.join(out_dir, f'{name}_gate.png'))
        save_panel(row['files']['queries'], draw_queries(image_rgb, points),
                   f'{block}: {describe_queries(points, image_rgb.shape)}')
        groups = len(row['gate_groups'])
        for key, title in (('position_weight', 'position weight D'),
                           ('gate', 'gate')):
            save_panel(row['files'][key],
                       to_image(row[key], meta, image_rgb.shape[:2]),
                       f'{block}: {title}, mean of {groups} groups')
        rows.append(row)
    write_grid(rows, image_rgb, meta, osp.join(out_dir, 'grid.png'))
    return rows


def _gate_row(block: str, name: str, x: Tensor, module: nn.Module,
              image_rgb: np.ndarray, meta: dict, out_dir: str) -> dict:
    """An SGE or CBAM block's row: its gate map, drawn."""
    with torch.no_grad():
        gate_groups = gate_maps(x, module)['gate'].numpy()
    kind = type(module).__name__
    row = dict(block=block, kind=kind, features=x[0].numpy(),
               gate_groups=gate_groups, gate=gate_groups.mean(0),
               query_xy=np.zeros((0, 2)),
               files=dict(gate=osp.join(out_dir, f'{name}_gate.png')))
    what = (f'SGE gate, mean of {len(gate_groups)} groups' if kind == 'SGE'
            else 'CBAM spatial gate')
    save_panel(row['files']['gate'],
               to_image(row['gate'], meta, image_rgb.shape[:2]),
               f'{block}: {what}')
    return row


GRID_CELL_INCHES, GRID_DPI = 3, 100


def write_grid(rows: List[dict], image_rgb: np.ndarray, meta: dict,
               path: str) -> None:
    """One row per block: query points, D, gate (with color bars)."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(
        len(rows), 3, squeeze=False,
        figsize=(3 * GRID_CELL_INCHES, len(rows) * GRID_CELL_INCHES))
    for ax_row, row in zip(axes, rows):
        prm = row['kind'] == 'PRM'
        ax_row[0].imshow(draw_queries(image_rgb, row['query_xy']))
        ax_row[0].set_title(f'{row["block"]}: ' + (describe_queries(
            row['query_xy'], image_rgb.shape) if prm else row['kind']),
            fontsize=7, wrap=True)
        for ax, key, title in ((ax_row[1], 'position_weight', 'D'),
                               (ax_row[2], 'gate', 'gate')):
            if key not in row:  # SGE and CBAM have no D
                continue
            shown = ax.imshow(to_image(row[key], meta, image_rgb.shape[:2]),
                              cmap='viridis')
            fig.colorbar(shown, ax=ax, fraction=0.046)
            ax.set_title(f'{title} (mean over groups)', fontsize=8)
        for ax in ax_row:
            ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=GRID_DPI)
    plt.close(fig)


def parse_args(argv=None):
    from mmengine.config import DictAction

    from prm_det.engine import TRUST_ENV
    parser = argparse.ArgumentParser(
        description='Draw PRM query points, position weights and gates '
        '(SGE and CBAM: their gates)')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file or URL')
    parser.add_argument('image', help='image file')
    parser.add_argument('--out-dir', required=True,
                        help='where the PNGs go')
    parser.add_argument('--blocks', nargs='+',
                        help='backbone blocks such as layer3.5 (default: the '
                        'last PRM, SGE or CBAM block of each stage)')
    parser.add_argument('--device', default='cpu', help='e.g. cpu, cuda:0')
    parser.add_argument(
        '--trust-checkpoint', action='store_true',
        help='load the checkpoint with full pickle, which can run code: only '
        'for a file you trust. Without it, it loads as tensors and the types '
        f'mmengine\'s Runner writes. Same as {TRUST_ENV}=1.')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value')
    args = parser.parse_args(argv)
    if args.trust_checkpoint:
        os.environ[TRUST_ENV] = '1'
    return args


def main(argv=None) -> List[dict]:
    from mmdet.apis import init_detector

    from prm_det.engine import (ChecksumMismatch, ConfigLoaderUnavailable,
                                UnusableCheckpoint, UntrustedCheckpoint,
                                install_safe_loading, load_config_file)
    install_safe_loading()  # the checkpoint loads as data
    args = parse_args(argv)
    from prm_det.engine import local_file_missing
    for path in (args.config, args.checkpoint, args.image):
        if local_file_missing(path):
            sys.exit(f'[vis_prm] file not found: {path}')
    try:
        cfg = load_config_file(args.config)
    except ConfigLoaderUnavailable as error:
        sys.exit(f'[vis_prm] error: {error}')
    try:
        model = init_detector(cfg, args.checkpoint, device=args.device,
                              cfg_options=args.cfg_options)
    except (UntrustedCheckpoint, UnusableCheckpoint, ChecksumMismatch,
            FileNotFoundError) as error:  # as tools/test.py's checkpoint
        sys.exit(f'[vis_prm] error: {error}')
    rows = visualize(model, args.image, args.out_dir, args.blocks)
    for row in rows:
        what = (f'{len(row["query_xy"])} query points' if row['kind'] ==
                'PRM' else f'{row["kind"]} gate')
        print(f'[vis_prm] {row["block"]}: {what} on a '
              f'{row["features"].shape[1]}x{row["features"].shape[2]} map -> '
              f'{", ".join(row["files"].values())}')
    print(f'[vis_prm] grid: {osp.join(args.out_dir, "grid.png")}')
    return rows


if __name__ == '__main__':
    main()
