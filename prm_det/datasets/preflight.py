"""The dataset checks before a run: every annotation file and image folder
a config's dataloaders read, checked before any training or evaluation
starts, so that a missing or unusable file stops the tools at once with
its name and the ways out, not a dataloader worker mid-run
(:func:`check_dataset_files`; tools/train.py and tools/test.py call it on
rank 0)."""
import json
import logging
import math
import os
import os.path as osp
import re
from typing import Iterable, Iterator, List, Optional, Tuple

from mmengine.config import Config
from mmengine.logging import print_log

from .image_checks import bad_images

_URI = re.compile(r'^[a-zA-Z][a-zA-Z0-9+.-]*://')  # s3://, http://, ...


class DatasetNotFound(FileNotFoundError):
    """A dataset file named by the config is not on disk."""


class DatasetInvalid(ValueError):
    """A dataset file named by the config is on disk but cannot be used."""


def _datasets(dataset_cfg) -> Iterable[dict]:
    """The leaf datasets of a dataset config (through wrappers)."""
    if dataset_cfg is None:
        return
    if 'datasets' in dataset_cfg:  # ConcatDataset
        for d in dataset_cfg['datasets']:
            yield from _datasets(d)
    elif 'dataset' in dataset_cfg:  # RepeatDataset, ClassBalancedDataset
        yield from _datasets(dataset_cfg['dataset'])
    else:
        yield dataset_cfg


def _local(path: Optional[str]) -> bool:
    return bool(path) and not _URI.match(path)


def _dataset_paths(cfg: Config, loaders: Iterable[str]
                   ) -> Iterator[Tuple[str, dict, Optional[str],
                                       Optional[str]]]:
    """(loader, dataset config, local annotation file, local image folder)
    for every leaf dataset of the given dataloaders; remote paths are None.
    """
    for loader in loaders:
        loader_cfg = cfg.get(loader)
        if not loader_cfg:
            continue
        for ds in _datasets(loader_cfg.get('dataset')):
            root = ds.get('data_root') or ''
            ann_file = ds.get('ann_file')
            ann_path = img_path = None
            if _local(ann_file):
                ann_path = ann_file if osp.isabs(ann_file) else osp.join(
                    root, ann_file)
            img_dir = (ds.get('data_prefix') or {}).get('img')
            if _local(img_dir) and _local(root or '.'):
                img_path = img_dir if osp.isabs(img_dir) else osp.join(
                    root, img_dir)
            yield loader, ds, ann_path, img_path


def missing_dataset_files(cfg: Config, loaders: Iterable[str]) -> List[str]:
    """Annotation files and image folders the given dataloaders need but are
    not on disk (remote paths are not checked)."""
    missing = []
    for loader, _, ann_path, img_path in _dataset_paths(cfg, loaders):
        if ann_path and not osp.isfile(ann_path):
            missing.append(f'{ann_path}  ({loader}.dataset.ann_file)')
        if img_path and not osp.isdir(img_path):
            missing.append(f'{img_path}  ({loader}.dataset.data_prefix)')
    return missing


def _is_coco_format(ds: dict) -> bool:
    """Whether mmdet reads this dataset with pycocotools (``CocoDataset``
    and its subclasses)."""
    try:
        from mmdet.datasets import CocoDataset
        from mmdet.registry import DATASETS
        cls = DATASETS.get(ds.get('type', ''))
    except (ImportError, KeyError):
        return False
    return isinstance(cls, type) and issubclass(cls, CocoDataset)


def _format_only(cfg: Config, loader: str) -> bool:
    """Whether the loader's evaluator only writes results (COCO test-dev:
    images without annotations)."""
    evaluator = cfg.get(loader.replace('_dataloader', '_evaluator'))
    evaluators = evaluator if isinstance(evaluator, list) else [evaluator]
    return any(isinstance(e, dict) and e.get('format_only')
               for e in evaluators)


def _is_box(bbox) -> bool:
    """Four finite numbers: mmdet drops a box with a NaN coordinate without
    a word and keeps one with an infinite one (its losses become NaN)."""
    return isinstance(bbox, list) and len(bbox) == 4 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool)
        and math.isfinite(v) for v in bbox)


def _duplicate_image_ids(coco: dict) -> dict:
    """Image id -> the file names of the images that share it (ids used
    more than once)."""
    files: dict = {}
    for im in coco['images']:
        if isinstance(im, dict):
            files.setdefault(im.get('id'), []).append(im.get('file_name'))
    return {k: v for k, v in files.items() if len(v) > 1}


def _dropped_boxes(coco: dict) -> List[int]:
    """Ids of the annotations mmdet's ``CocoDataset.parse_data_info`` drops
    without a word: no overlap with their image, zero area, or a width or
    height under one pixel."""
    sizes = {im.get('id'): (im.get('width'), im.get('height'))
             for im in coco['images'] if isinstance(im, dict)}
    dropped = []
    for ann in coco['annotations']:
        if not _is_box(ann.get('bbox')):
            continue  # reported as a problem by _coco_problems
        x1, y1, w, h = ann['bbox']
        img_w, img_h = sizes.get(ann.get('image_id'), (None, None))
        if img_w is None or img_h is None:
            continue
        inter_w = max(0, min(x1 + w, img_w) - max(x1, 0))
        inter_h = max(0, min(y1 + h, img_h) - max(y1, 0))
        if (inter_w * inter_h == 0 or ann.get('area', w * h) <= 0 or w < 1
                or h < 1):
            dropped.append(ann.get('id'))
    return dropped


def _coco_problems(cfg: Config, loader: str, ds: dict, ann_path: str,
                   img_path: Optional[str]) -> List[str]:
    """What makes a COCO-format dataset unusable, one line each (warnings
    for what mmdet would silently drop are printed here)."""
    where = f'({loader}.dataset.ann_file)'
    try:
        with open(ann_path) as f:
            coco = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return [f'{ann_path} is not valid JSON: {error} (a truncated or '
                f'damaged file?) {where}']
    keys = ('images', 'categories') if _format_only(cfg, loader) else (
        'images', 'annotations', 'categories')
    absent = [k for k in keys if not isinstance(
        coco.get(k) if isinstance(coco, dict) else None, list)]
    if absent:
        return [f'{ann_path} is not a COCO annotation file: it has no '
                f'{" / ".join(repr(k) for k in absent)} list (needs '
                f'"images", "annotations" and "categories") {where}']
    problems = []
    for key in keys:
        if not coco[key]:
            problems.append(f'{ann_path} lists no {key} {where}')
    if problems:
        return problems
    shared = _duplicate_image_ids(coco)
    if shared:
        examples = [f'{k} ({", ".join(map(str, v[:3]))})'
                    for k, v in list(shared.items())[:3]]
        problems.append(
            f'{ann_path}: {len(shared)} image ids belong to more than one '
            f'image, e.g. {"; ".join(examples)}: pycocotools keeps one image '
            f'per id and puts the boxes of all of them on it. Give each image '
            f'its own id {where}')
    classes = _classes(ds)
    if classes:
        names = {c.get('name') for c in coco['categories']
                 if isinstance(c, dict)}
        if not names.intersection(classes):
            problems.append(
                f'{ann_path}: none of the config\'s classes '
                f'({_first(list(classes))}) is among its categories '
                f'({_first(sorted(map(str, names)))}) {where}')
        else:
            _warn_dropped_categories(coco, classes, ann_path, loader)
    if img_path:
        missing = _missing_images(coco, ann_path, img_path, loader)
        problems += missing or _unreadable_images(coco, ann_path, img_path,
                                                  loader)
    annotations = coco.get('annotations') or []
    malformed = [a.get('id') if isinstance(a, dict) else a
                 for a in annotations
                 if not (isinstance(a, dict) and _is_box(a.get('bbox')))]
    if malformed:
        problems.append(
            f'{ann_path}: {len(malformed)} annotations have no "bbox" '
            f'[x, y, width, height], e.g. {_first(malformed)}: it needs four '
            f'finite numbers (NaN and infinity are not) {where}')
    elif annotations:
        dropped = _dropped_boxes(coco)
        if dropped:
            print_log(
                f'{ann_path}: {len(dropped)} of {len(annotations)} boxes have '
                f'a width or height under 1 pixel, no area, or lie outside '
                f'their image; mmdet drops them from {loader}. Annotation '
                f'ids: {_first(dropped)}',
                logger='current', level=logging.WARNING)
    return problems


def _classes(ds: dict) -> Optional[tuple]:
    """The class names the dataset keeps: the config's
    ``metainfo.classes``, else its dataset class's (CocoDataset: COCO's
    80)."""
    classes = (ds.get('metainfo') or {}).get('classes')
    if classes:
        return tuple(classes)
    try:
        from mmdet.registry import DATASETS
        return tuple(DATASETS.get(ds.get('type', '')).METAINFO['classes'])
    except (ImportError, KeyError, AttributeError, TypeError):
        return None


def _warn_dropped_categories(coco: dict, classes: tuple, ann_path: str,
                             loader: str) -> None:
    """Warn about the boxes mmdet's ``CocoDataset`` drops for their
    category: one whose name is not among the config's classes (it keeps
    only the categories named there, by exact name), or a ``category_id``
    no category defines; and about classes no category is named after."""
    categories = {c.get('id'): c.get('name') for c in coco['categories']
                  if isinstance(c, dict)}
    names = set(categories.values())
    kept = {cid for cid, name in categories.items() if name in classes}
    counts: dict = {}
    undefined: List = []
    for ann in coco['annotations']:
        cid = ann.get('category_id') if isinstance(ann, dict) else None
        if cid not in categories:
            undefined.append(ann.get('id') if isinstance(ann, dict) else ann)
        elif cid not in kept:
            counts[cid] = counts.get(cid, 0) + 1
    total = len(coco['annotations'])
    lines = []
    if counts:
        other = [f'{categories[cid]!r} (id {cid}, {n} boxes)'
                 for cid, n in sorted(counts.items())]
        lines.append(
            f'{sum(counts.values())} of {total} boxes are of categories that '
            f'are not among the config\'s classes, by exact name: '
            f'{_first(other, 10)}; mmdet drops them from {loader}. Rename '
            f'the category or list it in metainfo.classes.')
    if undefined:
        lines.append(
            f'{len(undefined)} of {total} boxes have a category_id that no '
            f'category defines; mmdet drops them from {loader}. Annotation '
            f'ids: {_first(undefined)}')
    absent = [c for c in classes if c not in names]
    if absent:
        lines.append(
            f'the config\'s classes {_first([repr(c) for c in absent], 10)} '
            f'are not among its categories '
            f'({_first(sorted(map(repr, names)), 10)}): {loader} has no '
            f'boxes of them.')
    for line in lines:
        print_log(f'{ann_path}: {line}', logger='current',
                  level=logging.WARNING)


def _unreadable_images(coco: dict, ann_path: str, img_path: str,
                       loader: str) -> List[str]:
    """Every image the annotation file lists that training could not read
    (:func:`~prm_det.datasets.image_checks.image_problem`), one line each."""
    files = [im.get('file_name', '') for im in coco['images']
             if isinstance(im, dict)]
    bad = bad_images(osp.join(img_path, name) for name in files)
    if not bad:
        return []
    return [f'{ann_path} lists {len(files)} images; {len(bad)} of them '
            f'cannot be read ({loader}.dataset.data_prefix); replace or '
            f'remove them:'] + [f'  {path}: {why}' for path, why in bad]


def _first(items: list, count: int = 5) -> str:
    return ', '.join(map(str, items[:count])) + (
        ', ...' if len(items) > count else '')


def _missing_images(coco: dict, ann_path: str, img_path: str,
                    loader: str) -> List[str]:
    """The images the annotation file lists that are not in the folder (one
    directory listing, not a file check per image)."""
    present = set(os.listdir(img_path))
    files = [im.get('file_name', '') for im in coco['images']
             if isinstance(im, dict)]
    missing = [name for name in files if name not in present and not
               ('/' in name and osp.isfile(osp.join(img_path, name)))]
    if not missing:
        return []
    what = ('is empty' if not present else
            f'lacks {len(missing)} of them, e.g. {_first(missing, 3)}')
    return [f'{ann_path} lists {len(files)} images; the image folder '
            f'{img_path} {what} ({loader}.dataset.data_prefix)']


def invalid_dataset_files(cfg: Config, loaders: Iterable[str]) -> List[str]:
    """Problems with the COCO-format annotation files and image folders of
    the given dataloaders, which are all on disk: a file that is not JSON
    or not COCO, no images, no annotations (unless the evaluator only
    formats results), no category the config names, images that are not in
    the folder or that training could not read (each named). Boxes mmdet
    would drop (degenerate, or of a category the config's classes do not
    name) are warned about.

    This reads each annotation file once more than mmdet will, and each
    image's header (COCO train 2017: some seconds each), so that a bad file
    stops the tools before any training, not inside a dataloader worker.
    """
    problems = []
    for loader, ds, ann_path, img_path in _dataset_paths(cfg, loaders):
        if ann_path and _is_coco_format(ds):
            problems += _coco_problems(cfg, loader, ds, ann_path, img_path)
    return problems


def check_dataset_files(cfg: Config, loaders: Iterable[str]) -> None:
    """Raise :class:`DatasetNotFound` naming what is missing and the ways out,
    or :class:`DatasetInvalid` naming each file and what is wrong with it,
    instead of a stack trace from inside a dataloader worker."""
    from ..engine.shipped_tools import shipped_tool
    missing = missing_dataset_files(cfg, loaders)
    if not missing:
        problems = invalid_dataset_files(cfg, loaders)
        if problems:
            raise DatasetInvalid('The dataset cannot be used:\n  ' +
                                 '\n  '.join(problems))
        return
    if _reads_generated_shapes(cfg, loaders):
        root = cfg.get('data_root', 'data/prm_demo/')
        ways = (f'  * write the generated shapes dataset there: python '
                f'{shipped_tool("make_shapes.py")} --out {root}, or\n'
                '  * point at a copy: --cfg-options data_root=/path/to/it/')
    else:
        root = cfg.get('data_root', 'data/coco/')
        ways = (f'  * download COCO 2017 to {root} (annotations/, train2017/, '
                'val2017/ from cocodataset.org), or\n'
                '  * point at your copy: --cfg-options data_root=/path/to/coco/'
                ', or\n'
                '  * try the embedded demo on generated data (it writes '
                'data/prm_demo/ and work_dirs/demo/ here): python '
                f'{shipped_tool("demo.py")}')
    raise DatasetNotFound(
        'The dataset is not where the config says:\n  ' +
        '\n  '.join(missing) + '\nWays out:\n' + ways)


def _reads_generated_shapes(cfg: Config, loaders: Iterable[str]) -> bool:
    """Whether a dataset of these loaders is prm_det's generated shapes
    (the demo configs: its classes)."""
    from prm_det.datasets.synthetic_shapes import metainfo
    classes = tuple(metainfo()['classes'])
    return any(tuple((ds.get('metainfo') or {}).get('classes') or ()) ==
               classes for _, ds, _, _ in _dataset_paths(cfg, loaders))
