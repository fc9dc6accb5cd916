"""The dataset checks before a run: every annotation file and image folder
a config's dataloaders read, checked before any training or evaluation
starts, so that a missing or unusable file stops the tools at once with
its name and the ways out, not a dataloader worker mid-run
(:func:`check_dataset_files`; tools/train.py and tools/test.py call it on
rank 0)."""
import contextlib
import io
import json
import logging
import math
import os
import os.path as osp
import re
import warnings
from typing import Iterable, Iterator, List, NamedTuple, Optional, Tuple

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


class MmdetReading(NamedTuple):
    """What mmdet's dataset class makes of an annotation file (its own
    ``load_data_list`` and ``filter_data``, :func:`read_as_mmdet`)."""
    #: the annotations it does not load, image by image as it reads them,
    #: then those of no image it read (never read): each image's
    #: annotations go through its ``parse_data_info``, which drops a box
    #: outside its image, of zero area, under one pixel wide or high (a NaN
    #: coordinate among them), marked ``ignore`` or of a category not in
    #: ``metainfo.classes``. Crowd boxes are loaded (``ignore_flag=1``).
    dropped: List[dict]
    #: the category ids it keeps (``metainfo.classes``, by exact name)
    cat_ids: List[int]
    #: images read, and of them those ``filter_cfg`` keeps
    images: int
    images_kept: int


def _dataset(ds: dict):
    """The config's dataset, built by mmdet's registry without reading its
    annotation file (``lazy_init``) nor building its pipeline."""
    from mmdet.registry import DATASETS
    return DATASETS.build(dict(ds, lazy_init=True, pipeline=[]))


def _instances(data_info) -> int:
    """The boxes ``parse_data_info`` kept (it may return one image's info
    or a list of them)."""
    infos = data_info if isinstance(data_info, list) else [data_info]
    return sum(len(info.get('instances', ())) for info in infos)


@contextlib.contextmanager
def _coco_api_from(dataset, coco: dict):
    """Let ``dataset.load_data_list`` index the annotations already read
    (``coco``) instead of parsing the JSON file a second time (COCO train
    2017: 450 MB), when its ``COCOAPI`` is pycocotools' class (mmdet's
    ``COCO`` wrapper): its loader calls ``self.COCOAPI(path)``. Other APIs
    (LVIS) read the file themselves. Yields a list that holds the index
    once the loader built it."""
    from pycocotools.coco import COCO
    api_class = dataset.COCOAPI
    built: list = []
    if not (isinstance(api_class, type) and issubclass(api_class, COCO)):
        yield built
        return

    def indexed(path):
        with contextlib.redirect_stdout(io.StringIO()):  # "creating index..."
            api = api_class()  # no file: an empty index
            api.dataset = coco
            api.createIndex()
        # mmdet's wrapper aliases these in __init__, to the empty index
        # pycocotools makes before reading a file; point them at this one
        for alias, name in (('img_ann_map', 'imgToAnns'),
                            ('cat_img_map', 'catToImgs')):
            if hasattr(api, alias):
                setattr(api, alias, getattr(api, name))
        built.append(api)
        return api

    dataset.COCOAPI = indexed  # this instance only
    try:
        yield built
    finally:
        del dataset.COCOAPI


def read_as_mmdet(ds: dict, coco: dict) -> MmdetReading:
    """Read the COCO annotations ``coco`` (the parsed file of ``ds``) with
    the dataset class, ``metainfo`` and ``filter_cfg`` of the dataset config
    ``ds``, through mmdet's own ``load_data_list`` (its ``parse_data_info``
    per image) and ``filter_data``, and report what it leaves out.

    Raises:
        DatasetInvalid: mmdet refuses the file (annotation ids used twice)
            or fails on it (a missing key), naming the problem.
    """
    try:
        dataset = _dataset(ds)
    except Exception as error:  # the registry's KeyError, a TypeError, ...
        raise DatasetInvalid(
            f'mmdet cannot build the dataset {ds.get("type")!r}: '
            f'{type(error).__name__}: {error}') from None
    with warnings.catch_warnings():
        # mmdet's COCO wrapper warns about mmpycocotools at every load
        warnings.simplefilter('ignore', UserWarning)
        with _coco_api_from(dataset, coco) as built:
            try:
                data_list = dataset.load_data_list()
            except AssertionError as error:  # ANN_ID_UNIQUE, among others
                way_out = (' Give each annotation its own id'
                           if 'not unique' in str(error) else '')
                raise DatasetInvalid(
                    f'mmdet refuses it: {error}{way_out}') from None
            except (KeyError, TypeError, ValueError, IndexError) as error:
                raise DatasetInvalid(
                    f'mmdet\'s {type(dataset).__name__} fails on it: '
                    f'{type(error).__name__}: {error} (each image needs '
                    f'"id", "file_name", "width" and "height"; each '
                    f'annotation "id", "image_id", "category_id", "bbox" and '
                    f'"area")') from None
    dataset.data_list = data_list
    kept = dataset.filter_data()
    if built:  # the index mmdet read the images and their boxes from
        by_image, raw_images = built[0].imgToAnns, built[0].imgs
    else:  # the same grouping, of the dicts in ``coco``
        by_image = {}
        for ann in coco.get('annotations') or ():
            by_image.setdefault(ann.get('image_id'), []).append(ann)
        raw_images = {im.get('id'): im for im in coco['images']
                      if isinstance(im, dict)}
    images = set()
    dropped = []
    for info in data_list:
        infos = info if isinstance(info, list) else [info]
        img_id = infos[0]['img_id']
        images.add(img_id)
        anns = by_image.get(img_id, ())
        if _instances(info) == len(anns):
            continue
        # which of them: parse_data_info decides box by box
        raw_img = dict(raw_images[img_id], img_id=img_id)
        dropped += [ann for ann in anns if not _instances(
            dataset.parse_data_info({'raw_ann_info': [ann],
                                     'raw_img_info': raw_img}))]
    dropped += [ann for image_id, anns in by_image.items()
                if image_id not in images for ann in anns]
    return MmdetReading(dropped, list(dataset.cat_ids), len(data_list),
                        len(kept))


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
    names = {c.get('name') for c in coco['categories'] if isinstance(c, dict)}
    named = bool(classes) and bool(names.intersection(classes))
    if classes and not named:
        problems.append(
            f'{ann_path}: none of the config\'s classes '
            f'({_first(list(classes))}) is among its categories '
            f'({_first(sorted(map(str, names)))}) {where}')
    if img_path:
        outside = _images_outside(coco, _data_root(ds, img_path), img_path)
        if outside:
            problems += _outside_message(coco, outside, ann_path, ds,
                                         img_path, loader)
        missing = _missing_images(coco, ann_path, img_path, loader, outside)
        problems += missing or _unreadable_images(coco, ann_path, img_path,
                                                  loader, outside)
    annotations = coco.get('annotations') or []
    malformed = [a.get('id') if isinstance(a, dict) else a
                 for a in annotations
                 if not (isinstance(a, dict) and _is_box(a.get('bbox')))]
    if malformed:
        problems.append(
            f'{ann_path}: {len(malformed)} annotations have no "bbox" '
            f'[x, y, width, height], e.g. {_first(malformed)}: it needs four '
            f'finite numbers (NaN and infinity are not) {where}')
    elif annotations and not shared and (named or not classes):
        try:
            reading = read_as_mmdet(ds, coco)
        except DatasetInvalid as error:
            return problems + [f'{ann_path}: {error} {where}']
        _warn_dropped(coco, reading, classes or (), ann_path, loader)
        if reading.images and not reading.images_kept:
            problems.append(
                f'{ann_path}: none of its {reading.images} images is left '
                f'once mmdet filters them by the dataset\'s filter_cfg '
                f'({ds.get("filter_cfg")}: filter_empty_gt drops the images '
                f'without a box of the classes, min_size those whose width or '
                f'height is smaller). Fix the images\' sizes or boxes, or '
                f'loosen filter_cfg {where}')
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


def _warn_dropped(coco: dict, reading: MmdetReading, classes: tuple,
                  ann_path: str, loader: str) -> None:
    """Warn about the boxes mmdet drops without a word
    (:attr:`MmdetReading.dropped`), grouped by why: a category whose name
    is not among the config's classes, a ``category_id`` no category
    defines, an ``image_id`` no image has, or the box itself; and about
    classes no category is named after."""
    categories = {c.get('id'): c.get('name') for c in coco['categories']
                  if isinstance(c, dict)}
    kept = set(reading.cat_ids)
    images = {im.get('id') for im in coco['images'] if isinstance(im, dict)}
    other: dict = {}
    undefined: List = []
    no_image: List = []
    degenerate: List = []
    for ann in reading.dropped:
        cid = ann.get('category_id')
        if ann.get('image_id') not in images:
            no_image.append(ann.get('id'))
        elif cid not in categories:
            undefined.append(ann.get('id'))
        elif cid not in kept:
            other[cid] = other.get(cid, 0) + 1
        else:
            degenerate.append(ann.get('id'))
    total = len(coco['annotations'])
    lines = []
    if other:
        names = [f'{categories[cid]!r} (id {cid}, {n} boxes)'
                 for cid, n in sorted(other.items())]
        lines.append(
            f'{sum(other.values())} of {total} boxes are of categories that '
            f'are not among the config\'s classes, by exact name: '
            f'{_first(names, 10)}; mmdet drops them from {loader}. Rename '
            f'the category or list it in metainfo.classes.')
    if undefined:
        lines.append(
            f'{len(undefined)} of {total} boxes have a category_id that no '
            f'category defines; mmdet drops them from {loader}. Annotation '
            f'ids: {_first(undefined)}')
    present = set(categories.values())
    absent = [c for c in classes if c not in present]
    if absent:
        lines.append(
            f'the config\'s classes {_first([repr(c) for c in absent], 10)} '
            f'are not among its categories '
            f'({_first(sorted(map(repr, present)), 10)}): {loader} has no '
            f'boxes of them.')
    if no_image:
        lines.append(
            f'{len(no_image)} of {total} boxes have an image_id that no '
            f'image has; mmdet drops them from {loader}. Annotation ids: '
            f'{_first(no_image)}')
    if degenerate:
        lines.append(
            f'{len(degenerate)} of {total} boxes have a width or height '
            f'under 1 pixel, no area, lie outside their image or are marked '
            f'"ignore"; mmdet drops them from {loader}. Annotation ids: '
            f'{_first(degenerate)}')
    for line in lines:
        print_log(f'{ann_path}: {line}', logger='current',
                  level=logging.WARNING)


def _listed_images(coco: dict) -> list:
    """The ``file_name`` of every image the annotation file lists."""
    return [im.get('file_name', '') for im in coco['images']
            if isinstance(im, dict)]


def _within(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or under it, by their absolute,
    normalized names (``..`` resolved, symbolic links not followed: a link
    the user made in the data folder is theirs to make)."""
    path, folder = osp.abspath(path), osp.abspath(folder)
    return osp.commonpath([path, folder]) == folder


def _data_root(ds: dict, img_path: str) -> str:
    """The folder every image of the dataset must be in: its ``data_root``
    when the image folder is under it (mmdet joins them), else the image
    folder itself (an absolute ``data_prefix.img`` elsewhere)."""
    root = ds.get('data_root') or ''
    return root if _local(root) and _within(img_path, root) else img_path


def _leaves(name: str, img_path: str, root: str) -> bool:
    """Whether the image ``name`` (a file_name, joined to ``img_path`` as
    mmdet joins it) is outside ``root``, decided without opening anything:
    an absolute name or one whose ``..`` climbs out, by the names; one with
    ``..`` that stays in by its name, also as the system resolves it (a
    ``..`` after a symbolic link to a folder leaves from where the link
    points). A name without ``..`` goes down from the image folder: the
    links it meets there are the user's own, followed as the dataloader
    follows them."""
    path = osp.join(img_path, name)
    if not _within(path, root):
        return True
    return '..' in re.split(r'[\\/]', name) and not _within(
        osp.realpath(path), osp.realpath(root))


def _images_outside(coco: dict, root: str, img_path: str) -> List[str]:
    """The file names that lead out of ``root`` (:func:`_leaves`), found
    before any image is opened, so that an annotation file cannot make the
    checks read a file of the machine's (and show its first bytes)."""
    return [name for name in _listed_images(coco)
            if isinstance(name, str) and _leaves(name, img_path, root)]


def _outside_message(coco: dict, outside: List[str], ann_path: str,
                     ds: dict, img_path: str, loader: str) -> List[str]:
    """The images whose file_name leaves the data root, one line each."""
    root = osp.abspath(_data_root(ds, img_path))
    return [f'{ann_path} lists {len(_listed_images(coco))} images; the '
            f'file_name of {len(outside)} of them leads outside the data '
            f'root {root} (not opened): give each a file_name under the '
            f'image folder {img_path} ({loader}.dataset.data_prefix):'] + [
                f'  {name}: outside the data root (it names '
                f'{osp.normpath(osp.join(img_path, name))})'
                for name in outside]


def _unreadable_images(coco: dict, ann_path: str, img_path: str,
                       loader: str, outside: List[str] = ()) -> List[str]:
    """Every image the annotation file lists that training could not read
    (:func:`~prm_det.datasets.image_checks.image_problem`), one line each;
    those ``outside`` the data root are not opened."""
    files = _listed_images(coco)
    skip = set(outside)
    bad = bad_images(osp.join(img_path, name) for name in files
                     if name not in skip)
    if not bad:
        return []
    return [f'{ann_path} lists {len(files)} images; {len(bad)} of them '
            f'cannot be read ({loader}.dataset.data_prefix); replace or '
            f'remove them:'] + [f'  {path}: {why}' for path, why in bad]


def _first(items: list, count: int = 5) -> str:
    return ', '.join(map(str, items[:count])) + (
        ', ...' if len(items) > count else '')


def _missing_images(coco: dict, ann_path: str, img_path: str,
                    loader: str, outside: List[str] = ()) -> List[str]:
    """The images the annotation file lists that are not in the folder (one
    directory listing, not a file check per image); those ``outside`` the
    data root are not looked for."""
    present = set(os.listdir(img_path))
    files = _listed_images(coco)
    skip = set(outside)
    missing = [name for name in files if name not in present and
               name not in skip and not
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
    formats results), no category the config names, images whose file_name
    leads out of the data root (named, never opened), images that are not
    in the folder or that training could not read (each named), annotations
    mmdet's own loader refuses or fails on, no image left after the
    dataset's filter_cfg. The boxes mmdet drops, as its dataset class loads
    the file (:func:`read_as_mmdet`), are warned about, grouped by why.

    This reads each annotation file once more than mmdet will, loads it as
    mmdet's dataset does (from the parsed JSON), and reads each image's
    header (COCO train 2017: some seconds each), so that a bad file stops
    the tools before any training, not inside a dataloader worker.
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
