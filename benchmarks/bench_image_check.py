"""What the image check before training costs (``prm_det.datasets.image_checks``).

    python benchmarks/bench_image_check.py [--images 5000] [--threads 8]
        [--out FILE.md]

Writes ``--images`` JPEG files the size of COCO's (640x480, quality 90, a
64 KB EXIF-like APP1 segment before the frame header, which Pillow's header
read has to get past), checks them twice (the first pass after the files were written,
so from the page cache: a warm disk; the second the same), and reports the
time per image and the time for COCO train 2017's 118,287 images at that
rate. A cold disk or a network file system adds its read latency (the
header and the last bytes of each file, read by ``--threads`` threads at
once).
"""
import argparse
import os
import os.path as osp
import platform
import struct
import tempfile
import time

import cv2
import numpy as np

from prm_det.datasets.image_checks import bad_images

COCO_TRAIN = 118287


def write_images(folder, count):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
    base = cv2.GaussianBlur(base, (0, 0), 3)
    ok, jpeg = cv2.imencode('.jpg', base, [cv2.IMWRITE_JPEG_QUALITY, 90])
    data = jpeg.tobytes()
    app1 = b'\xff\xe1' + struct.pack('>H', 65535) + bytes(65533)
    data = data[:2] + app1 + data[2:]
    paths = []
    for i in range(count):
        path = osp.join(folder, f'{i:012d}.jpg')
        with open(path, 'wb') as f:
            f.write(data)
        paths.append(path)
    return paths, len(data)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--images', type=int, default=5000)
    parser.add_argument('--threads', type=int, default=8)
    parser.add_argument('--out', help='write the report here (markdown)')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        paths, size = write_images(folder, args.images)
        times = []
        for _ in range(2):
            start = time.perf_counter()
            bad = bad_images(paths, threads=args.threads)
            times.append(time.perf_counter() - start)
            assert not bad, bad[:3]
    per_image = min(times) / args.images
    lines = [
        '# Image check before training (prm_det.datasets.image_checks)', '',
        f'Machine: {platform.processor() or platform.machine()}, '
        f'{os.cpu_count()} CPUs; {args.images} JPEGs of 640x480 '
        f'({size // 1024} KB each, a 64 KB APP1 segment), page cache warm, '
        f'{args.threads} threads; load average '
        f'{os.getloadavg()[0]:.1f} at the end.', '',
        '| images | time (best of 2) | per image | COCO train 2017 '
        f'({COCO_TRAIN:,} images) at that rate |',
        '|---|---|---|---|',
        f'| {args.images} | {min(times):.2f} s | {per_image * 1e6:.0f} us | '
        f'{per_image * COCO_TRAIN:.1f} s |',
    ]
    report = '\n'.join(lines) + '\n'
    print(report)
    if args.out:
        with open(args.out, 'w') as f:
            f.write(report)


if __name__ == '__main__':
    main()
