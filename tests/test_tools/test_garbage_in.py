"""Garbage in is an error out, before any training or evaluation: unusable
annotation files and image folders, boxes mmdet would drop, checkpoints of
another model."""
import json
import os
import os.path as osp
import re
import shutil
import subprocess
import sys

import pytest
import torch
from mmdet.registry import MODELS
from tool_runs import (CASCADE, REPO, RETINA, ok, parse_ap_table,
                       tiny_options, tool_env)

import prm_det.datasets.preflight as preflight
from prm_det.engine.checkpoints.reading import CheckpointMismatch, check_checkpoint_fits
from prm_det.engine import (DatasetInvalid, check_dataset_files,
                                   load_config)

LOADERS = ['train_dataloader', 'val_dataloader']


@pytest.fixture
def data(tiny_data, tmp_path):
    """A copy of the tiny dataset to damage."""
    root = str(tmp_path / 'shapes')
    shutil.copytree(tiny_data, root)
    return root


def train_json(root):
    return osp.join(root, 'annotations', 'instances_train.json')


def edit_train_json(root, edit):
    with open(train_json(root)) as f:
        coco = json.load(f)
    edit(coco)
    with open(train_json(root), 'w') as f:
        json.dump(coco, f)


def check(root):
    cfg = load_config(osp.join(REPO, RETINA), {'data_root': root})
    check_dataset_files(cfg, LOADERS)


def truncate(root):
    with open(train_json(root)) as f:
        text = f.read()
    with open(train_json(root), 'w') as f:
        f.write(text[:len(text) // 2])


def empty_object(root):
    with open(train_json(root), 'w') as f:
        f.write('{}')


def empty_image_folder(root):
    for name in os.listdir(osp.join(root, 'train')):
        os.remove(osp.join(root, 'train', name))


def rename_categories(root):
    edit_train_json(root, lambda coco: [
        c.update(name=f'thing{i}') for i, c in enumerate(coco['categories'])])


@pytest.mark.parametrize('damage, says', [
    (truncate, 'is not valid JSON'),
    (empty_object, 'is not a COCO annotation file: it has no \'images\' / '
     '\'annotations\' / \'categories\' list'),
    (lambda root: edit_train_json(root, lambda c: c.update(images=[])),
     'lists no images'),
    (lambda root: edit_train_json(root, lambda c: c.update(annotations=[])),
     'lists no annotations'),
    (empty_image_folder, 'lists 8 images; the image folder'),
    (rename_categories, 'none of the config\'s classes'),
    (lambda root: edit_train_json(
        root, lambda c: c['annotations'][0].pop('bbox')),
     '1 annotations have no "bbox" [x, y, width, height], e.g. '),
], ids=['truncated json', '{}', 'no images', 'no annotations',
        'empty image folder', 'other categories', 'no bbox'])
def test_an_unusable_annotation_file_or_folder_stops_before_training(
        data, damage, says):
    damage(data)
    with pytest.raises(DatasetInvalid) as info:
        check(data)
    message = str(info.value)
    assert train_json(data) in message  # names the file
    assert says in message
    if damage is empty_image_folder:
        assert message.rstrip().endswith(
            f'{osp.join(data, "train/")} is empty '
            f'(train_dataloader.dataset.data_prefix)')


def test_boxes_mmdet_would_drop_are_counted_with_their_ids(data, monkeypatch):
    said = []
    monkeypatch.setattr(preflight, 'print_log',
                        lambda msg, **kw: said.append(msg))
    check(data)
    assert said == []  # the generated boxes are all fine

    def degenerate(coco):
        for ann, (w, h) in zip(coco['annotations'],
                               [(0, 10), (-3, 10), (10, 0.5)]):
            ann['bbox'][2:] = [w, h]
    edit_train_json(data, degenerate)
    check(data)  # a warning, not an error
    assert len(said) == 1
    with open(train_json(data)) as f:
        coco = json.load(f)
    ids = [ann['id'] for ann in coco['annotations'][:3]]
    assert (f'{train_json(data)}: 3 of {len(coco["annotations"])} boxes '
            f'have a width or height under 1 pixel') in said[0]
    assert f'Annotation ids: {", ".join(map(str, ids))}' in said[0]


@pytest.mark.slow
def test_train_py_stops_on_a_truncated_annotation_file(data):
    truncate(data)
    proc = subprocess.run(
        [sys.executable, 'tools/train.py', RETINA, '--work-dir',
         osp.join(data, 'work')] + tiny_options(data),
        cwd=REPO, env=tool_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f'{train_json(data)} is not valid JSON' in proc.stderr
    assert 'Traceback' not in proc.stderr
    assert 'Epoch(train)' not in proc.stdout


def build(config):
    cfg = load_config(osp.join(REPO, config))
    return MODELS.build(cfg.model)


def test_a_checkpoint_must_fit_the_model():
    retina, cascade = build(RETINA), build(CASCADE)
    state = retina.state_dict()
    check_checkpoint_fits(retina, {'state_dict': state}, 'same.pth')
    # BatchNorm counters are not required (older checkpoints lack them)
    check_checkpoint_fits(retina, {k: v for k, v in state.items()
                                   if 'num_batches_tracked' not in k}, 'old')
    with pytest.raises(CheckpointMismatch) as info:
        check_checkpoint_fits(cascade, {'state_dict': state}, 'retina.pth')
    message = str(info.value)
    assert 'The checkpoint retina.pth does not fit the model' in message
    assert 'of the model\'s' in message and 'weights are not in it' in message
    assert 'rpn_head.rpn_conv.weight' in message  # the RPN is not in RetinaNet
    assert 'of its' in message and 'are not in the model, e.g.' in message
    assert 'weights have other shapes, e.g. neck.' in message
    assert '--allow-key-mismatch' in message
    with pytest.raises(CheckpointMismatch, match='are not in it'):
        check_checkpoint_fits(retina, {'w': torch.randn(3)}, 'random.pth')
    narrow = dict(state)
    narrow['bbox_head.retina_cls.weight'] = torch.zeros(9, 64, 3, 3)
    with pytest.raises(CheckpointMismatch, match=(
            r'1 weights have other shapes, e.g. bbox_head.retina_cls.weight: '
            r'checkpoint \(9, 64, 3, 3\), model \(36, 64, 3, 3\)')):
        check_checkpoint_fits(retina, narrow, 'other_classes.pth')


@pytest.mark.slow
def test_test_py_refuses_another_models_checkpoint_unless_told(
        tiny_data, tmp_path, demo_checkpoint):
    """The RetinaNet demo weights under the Cascade R-CNN demo config: an
    error listing keys. RetinaNet weights without their head, with
    --allow-key-mismatch: an AP table (the two run side by side)."""
    state = torch.load(demo_checkpoint, weights_only=True)['state_dict']
    retina, headless = str(tmp_path / 'retina.pth'), str(tmp_path / 'hl.pth')
    torch.save({'meta': {}, 'state_dict': state}, retina)
    torch.save({'meta': {}, 'state_dict': {
        k: v for k, v in state.items() if not k.startswith('bbox_head.')}},
        headless)
    refused, allowed = [
        subprocess.Popen(
            [sys.executable, 'tools/test.py', config, ckpt, '--work-dir',
             str(tmp_path / config)] + tiny_options(tiny_data, config=config)
            + extra, cwd=REPO, env=tool_env(OMP_NUM_THREADS='1'), text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for config, ckpt, extra in ((CASCADE, retina, []), (
            RETINA, headless, ['--allow-key-mismatch']))]
    out, err = refused.communicate(timeout=300)
    assert refused.returncode != 0
    assert f'The checkpoint {retina} does not fit the model' in err
    assert 'rpn_head.rpn_conv.weight' in err and '--allow-key-mismatch' in err
    assert 'COCO box AP' not in out and 'Traceback' not in err
    out, err = allowed.communicate(timeout=300)
    proc = subprocess.CompletedProcess([], allowed.returncode, out, err)
    assert len(parse_ap_table(ok(proc))) == 6


def image(root, index):
    return osp.join(root, 'train', f'{index:06d}.png')


def damage_images(root):
    """Four kinds of unreadable image, the ways they reach datasets; returns
    {path: what the check must say}."""
    import cv2
    with open(image(root, 0), 'w') as f:
        f.write('<html>404 Not Found</html>')
    png = image(root, 1)
    with open(png, 'rb') as f:
        data = f.read()
    with open(png, 'wb') as f:
        f.write(data[:len(data) // 2])
    # a JPEG (under a .png name: cv2 reads by content) cut inside its header
    ok_, jpeg = cv2.imencode('.jpg', cv2.imread(image(root, 2)))
    with open(image(root, 2), 'wb') as f:
        f.write(jpeg.tobytes()[:100])
    open(image(root, 3), 'w').close()
    return {
        image(root, 0): 'not an image: no image format starts with '
                        "b'<html>40'",
        png: 'a PNG file cut short or damaged (it cannot be decoded)',
        image(root, 2): 'an image file whose header is cut short or damaged '
                        '(Pillow: Truncated File Read; it starts with '
                        "b'\\xff\\xd8\\xff\\xe0\\x00\\x10JF')",
        image(root, 3): 'empty file (0 bytes)',
    }


def test_unreadable_images_stop_before_training_each_named(data):
    bad = damage_images(data)
    with pytest.raises(DatasetInvalid) as info:
        check(data)
    message = str(info.value)
    assert (f'{train_json(data)} lists 8 images; 4 of them cannot be read '
            f'(train_dataloader.dataset.data_prefix)') in message
    for path, why in bad.items():
        assert f'  {path}: {why}\n' in message + '\n', message


@pytest.mark.slow
def test_train_py_names_every_unreadable_image_before_training(data):
    bad = damage_images(data)
    proc = subprocess.run(
        [sys.executable, osp.join(REPO, 'tools', 'train.py'),
         osp.join(REPO, RETINA), '--work-dir', osp.join(data, 'work')] +
        tiny_options(data),
        cwd=data, env=tool_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert 'Traceback' not in proc.stderr
    assert 'Epoch(train)' not in proc.stdout
    for path, why in bad.items():
        assert f'{path}: {why}' in proc.stderr, proc.stderr[-3000:]


def test_boxes_of_categories_the_config_does_not_name_are_counted(
        data, monkeypatch):
    """mmdet keeps the categories named in metainfo.classes, by exact name,
    and drops the other boxes without a word: a renamed category and a
    category_id no category defines are warned about, with counts."""
    said = []
    monkeypatch.setattr(preflight, 'print_log',
                        lambda msg, **kw: said.append(msg))
    with open(train_json(data)) as f:
        coco = json.load(f)
    cross = next(c for c in coco['categories'] if c['name'] == 'cross')
    crosses = sum(a['category_id'] == cross['id']
                  for a in coco['annotations'])
    assert crosses > 0

    def edit(coco):
        next(c for c in coco['categories']
             if c['name'] == 'cross')['name'] = 'Cross'
        coco['annotations'][0]['category_id'] = 99
    edit_train_json(data, edit)
    orphan = coco['annotations'][0]
    crosses -= orphan['category_id'] == cross['id']
    check(data)  # warnings, not errors
    total = len(coco['annotations'])
    assert said == [
        f'{train_json(data)}: {crosses} of {total} boxes are of categories '
        f'that are not among the config\'s classes, by exact name: '
        f'\'Cross\' (id {cross["id"]}, {crosses} boxes); mmdet drops them '
        f'from train_dataloader. Rename the category or list it in '
        f'metainfo.classes.',
        f'{train_json(data)}: 1 of {total} boxes have a category_id that no '
        f'category defines; mmdet drops them from train_dataloader. '
        f'Annotation ids: {orphan["id"]}',
        f'{train_json(data)}: the config\'s classes \'cross\' are not among '
        f'its categories (\'Cross\', \'ellipse\', \'rectangle\', '
        f'\'triangle\'): train_dataloader has no boxes of them.',
    ]


def share_an_image_id(coco):
    coco['images'][1]['id'] = coco['images'][0]['id']


def share_an_annotation_id(coco):
    coco['annotations'][1]['id'] = coco['annotations'][0]['id']


def no_area(coco):
    coco['annotations'][0].pop('area')


def nan_coordinate(coco):
    coco['annotations'][0]['bbox'][0] = float('nan')


def infinite_width(coco):
    coco['annotations'][0]['bbox'][2] = float('inf')


@pytest.mark.parametrize('edit, says', [
    (share_an_image_id, '1 image ids belong to more than one image, e.g. '),
    (share_an_annotation_id, 'mmdet refuses it: Annotation ids in '),
    (no_area, 'mmdet\'s CocoDataset fails on it: KeyError: \'area\' (each '
     'image needs "id", "file_name", "width" and "height"; each annotation '
     '"id", "image_id", "category_id", "bbox" and "area")'),
    (nan_coordinate, 'it needs four finite numbers (NaN and infinity are not)'),
    (infinite_width, 'it needs four finite numbers (NaN and infinity are not)'),
], ids=['shared image id', 'shared annotation id', 'no area',
        'NaN coordinate', 'infinite width'])
def test_what_mmdet_would_misread_stops_before_training(data, edit, says):
    """Two images with one id: pycocotools keeps one and hangs the boxes of
    both on it (training runs, wrongly). Two annotations with one id, or one
    without "area": mmdet's load fails (the preflight says why and where).
    A NaN box mmdet drops silently, an infinite one it keeps (NaN
    losses)."""
    edit_train_json(data, edit)
    with pytest.raises(DatasetInvalid) as info:
        check(data)
    message = str(info.value)
    assert train_json(data) in message and says in message
    if edit is share_an_image_id:
        with open(train_json(data)) as f:
            first, second = json.load(f)['images'][:2]
        assert (f"{first['id']} ({first['file_name']}, "
                f"{second['file_name']})") in message
    if edit is share_an_annotation_id:  # mmdet's own refusal, and the way out
        assert 'are not unique! Give each annotation its own id' in message
        with pytest.raises(AssertionError, match='are not unique'):
            mmdet_dataset(data).load_data_list()
    if edit is no_area:  # what mmdet's own load raises, without a file name
        with pytest.raises(KeyError, match='area'):
            mmdet_dataset(data).load_data_list()


def test_an_image_larger_than_the_decoder_accepts_stops_before_training(
        data):
    """A PNG whose header declares 50000x50000 pixels: OpenCV's decoder
    refuses more than CV_IO_MAX_IMAGE_PIXELS (2^30), which would kill a
    dataloader worker mid-training."""
    import struct
    import zlib
    with open(train_json(data)) as f:
        name = json.load(f)['images'][0]['file_name']
    path = osp.join(data, 'train', name)
    ihdr = struct.pack('>IIBBBBB', 50000, 50000, 8, 2, 0, 0, 0)
    with open(path, 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n' + struct.pack('>I', 13) + b'IHDR' +
                ihdr + struct.pack('>I', zlib.crc32(b'IHDR' + ihdr)) +
                b'\x00\x00\x00\x00IEND\xaeB`\x82')
    with pytest.raises(DatasetInvalid) as info:
        check(data)
    assert (f'{path}: a PNG file of 50000x50000 pixels, more than OpenCV '
            f'decodes (1073741824, its CV_IO_MAX_IMAGE_PIXELS)'
            ) in str(info.value)


def train_dataset_cfg(root):
    cfg = load_config(osp.join(REPO, RETINA), {'data_root': root})
    return dict(cfg.train_dataloader.dataset)


def read_train_json(root):
    with open(train_json(root)) as f:
        return json.load(f)


def mmdet_dataset(root):
    """The train dataset of the config, as mmdet builds it (not loaded)."""
    from mmdet.registry import DATASETS
    return DATASETS.build(dict(train_dataset_cfg(root), pipeline=[],
                               lazy_init=True))


def hostile(coco, with_nan=True):
    """Boxes mmdet drops or ignores, on the first image; returns
    {annotation id: what it is}."""
    image = coco['images'][0]
    width = image['width']
    coco['categories'].append({'id': 50, 'name': 'circle'})
    kinds = {
        'zero area': dict(area=0),
        'zero width': dict(bbox=[10, 10, 0, 20]),
        'outside the image': dict(bbox=[width + 5, 10, 20, 20]),
        'undefined category': dict(category_id=99),
        'category not in classes': dict(category_id=50),
        'marked ignore': dict(ignore=True),
        'no such image': dict(image_id=max(
            im['id'] for im in coco['images']) + 1),
        'crowd': dict(iscrowd=1),  # loaded, with ignore_flag=1
    }
    if with_nan:
        kinds['NaN coordinate'] = dict(bbox=[float('nan'), 10, 20, 20])
    template = coco['annotations'][0]
    next_id = max(a['id'] for a in coco['annotations']) + 1
    ids = {}
    for offset, (kind, change) in enumerate(kinds.items()):
        ann = dict(template, bbox=[10, 10, 20, 20], area=400, iscrowd=0,
                   image_id=image['id'], id=next_id + offset)
        ann.update(change)
        coco['annotations'].append(ann)
        ids[ann['id']] = kind
    return ids


def test_the_preflight_counts_exactly_the_boxes_mmdet_drops(data):
    """mmdet's own CocoDataset, loading the file itself, drops the boxes
    the preflight's reading names, no more, no fewer: a NaN coordinate,
    zero area or width, outside the image, a category undefined or not
    among the classes, marked ignore, of no image; a crowd box it keeps,
    as ignored."""
    ids: dict = {}
    edit_train_json(data, lambda coco: ids.update(hostile(coco)))
    coco = read_train_json(data)
    dataset = mmdet_dataset(data)
    loaded = dataset.load_data_list()  # mmdet, reading the file
    kept = sum(len(info['instances']) for info in loaded)
    crowd = next(i for i, kind in ids.items() if kind == 'crowd')

    reading = preflight.read_as_mmdet(train_dataset_cfg(data), coco)

    assert len(reading.dropped) == len(coco['annotations']) - kept
    assert sorted(ann['id'] for ann in reading.dropped) == sorted(
        i for i in ids if i != crowd)
    first = next(info for info in loaded
                 if info['img_id'] == coco['images'][0]['id'])
    assert [inst['ignore_flag'] for inst in first['instances']
            if inst['bbox'] == [10, 10, 30, 30]] == [1]  # the crowd box
    assert reading.cat_ids == dataset.cat_ids
    # the NaN box stops the tools (mmdet would drop it without a word)
    with pytest.raises(DatasetInvalid) as info:
        check(data)
    nan_id = next(i for i, kind in ids.items() if kind == 'NaN coordinate')
    assert (f'1 annotations have no "bbox" [x, y, width, height], e.g. '
            f'{nan_id}: it needs four finite numbers') in str(info.value)


def test_the_warnings_add_up_to_the_boxes_mmdet_drops(data, monkeypatch):
    said = []
    monkeypatch.setattr(preflight, 'print_log',
                        lambda msg, **kw: said.append(msg))
    ids: dict = {}
    edit_train_json(data, lambda coco: ids.update(hostile(coco, False)))
    check(data)  # warnings, not errors
    loaded = mmdet_dataset(data).load_data_list()
    total = len(read_train_json(data)['annotations'])
    dropped = total - sum(len(info['instances']) for info in loaded)
    assert dropped == len(ids) - 1  # all but the crowd box
    counts = [re.search(r': (\d+) of (\d+) boxes ', line) for line in said]
    assert all(counts), said
    assert sum(int(m.group(1)) for m in counts) == dropped
    assert {int(m.group(2)) for m in counts} == {total}
    by_kind = {kind: i for i, kind in ids.items()}
    assert any('an image_id that no image has' in line and
               str(by_kind['no such image']) in line for line in said)
    assert any('a category_id that no category defines' in line and
               str(by_kind['undefined category']) in line for line in said)


def test_a_dataset_left_without_images_stops_before_training(data):
    """mmdet's filter_cfg (here min_size=4) leaves no image to train on:
    mmengine then fails serializing the empty list, naming neither."""
    def tiny(coco):
        for im in coco['images']:
            im['width'] = im['height'] = 3
    edit_train_json(data, tiny)
    reading = preflight.read_as_mmdet(train_dataset_cfg(data),
                                      read_train_json(data))
    assert (reading.images, reading.images_kept) == (8, 0)
    with pytest.raises(ValueError, match='need at least one array'):
        mmdet_dataset(data).full_init()  # mmdet's own load
    with pytest.raises(DatasetInvalid) as info:
        check(data)
    assert (f'{train_json(data)}: none of its 8 images is left once mmdet '
            f'filters them by the dataset\'s filter_cfg ({{\'filter_empty_gt\''
            f': True, \'min_size\': 4}}') in str(info.value)


def test_an_image_over_pillows_limit_but_within_opencvs_passes(
        tmp_path, monkeypatch):
    """The headers are read through Pillow, whose decompression-bomb check
    refuses twice 89M pixels; training decodes with OpenCV (2^30): a whole
    PNG of 200M pixels passes from its header and end, without a decode,
    and Pillow's limit is left as it was."""
    from PIL import Image

    from prm_det.datasets import image_checks
    from prm_det.datasets.image_checks import bad_images, image_problem
    monkeypatch.setattr(image_checks, '_decodes',
                        lambda path: pytest.fail(f'{path} decoded'))
    path = str(tmp_path / 'wide.png')
    Image.new('1', (20000, 10000)).save(path)
    limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    assert image_problem(path) is None
    assert bad_images([path]) == []
    assert Image.MAX_IMAGE_PIXELS == limit


def spy_on_opens(monkeypatch):
    """Every file opened from here on, by Python's ``open`` or Pillow's
    ``Image.open`` (what the image checks read headers with): a list of
    the paths, filled as they are opened."""
    import builtins

    from PIL import Image
    opened = []
    real_open, real_image_open = builtins.open, Image.open

    def spy_open(file, *args, **kwargs):
        opened.append(file)
        return real_open(file, *args, **kwargs)

    def spy_image_open(fp, *args, **kwargs):
        opened.append(getattr(fp, 'name', fp))
        return real_image_open(fp, *args, **kwargs)
    monkeypatch.setattr(builtins, 'open', spy_open)
    monkeypatch.setattr(Image, 'open', spy_image_open)
    return opened


def leave_the_data_root(data, tmp_path, escape):
    """An image whose file_name leads to a file outside the data root
    (``data``, its images in ``data/train/``): by ``../``, by an absolute
    path, by a ``..`` after a link to a folder elsewhere (inside by its
    name, outside as the system resolves it), and the issue's
    ``../../../../etc/hostname`` with enough ``..`` to reach it from here.
    Returns (the file_name, the file it names)."""
    secret = tmp_path / 'secret.png'
    if escape == 'link':  # data/train -> elsewhere/images
        images = tmp_path / 'elsewhere' / 'images'
        shutil.move(osp.join(data, 'train'), images)
        os.symlink(images, osp.join(data, 'train'))
        secret = tmp_path / 'elsewhere' / 'secret.png'
    secret.write_bytes(b'SECRET of the machine, not an image')
    name = {'relative': '../../secret.png', 'absolute': str(secret),
            'link': '../secret.png',
            'etc/hostname': '../' * 40 + 'etc/hostname'}[escape]
    if escape == 'etc/hostname':
        secret = '/etc/hostname'
    edit_train_json(data, lambda coco: coco['images'][0].update(
        file_name=name))
    return name, str(secret)


@pytest.mark.parametrize('escape', ['relative', 'absolute', 'link',
                                    'etc/hostname'])
def test_an_image_outside_the_data_root_is_named_and_never_opened(
        data, tmp_path, monkeypatch, escape):
    name, target = leave_the_data_root(data, tmp_path, escape)
    cfg = load_config(osp.join(REPO, RETINA), {'data_root': data})
    opened = spy_on_opens(monkeypatch)
    with pytest.raises(DatasetInvalid) as info:
        check_dataset_files(cfg, LOADERS)
    monkeypatch.undo()
    assert opened, 'the spy saw nothing: the check opens no file?'
    assert not [path for path in opened if isinstance(path, (str, os.PathLike))
                and osp.realpath(path) == osp.realpath(target)]
    message = str(info.value)
    assert (f'{train_json(data)} lists 8 images; the file_name of 1 of '
            f'them leads outside the data root {osp.abspath(data)} (not '
            f'opened)') in message, message
    assert f'\n    {name}: outside the data root (it names ' in message
    assert 'SECRET' not in message
    assert 'cannot be read' not in message  # the other 7 are fine


def test_a_file_name_with_dots_that_stays_in_the_data_root_passes(
        data, monkeypatch):
    """``..`` is not refused as such: one that stays under the data root
    names an image there, which is checked as any other."""
    edit_train_json(data, lambda coco: coco['images'][0].update(
        file_name='../train/' + coco['images'][0]['file_name']))
    opened = spy_on_opens(monkeypatch)
    check(data)
    monkeypatch.undo()
    assert osp.join(data, 'train', '..', 'train', '000000.png') in opened
