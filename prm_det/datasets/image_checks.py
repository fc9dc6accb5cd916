"""Image files that training would fail on, found before it starts.

mmdet reads an image only when a dataloader worker first needs it: a file
that is empty, not an image or cut short stops the training there, after
any number of iterations (``AssertionError: failed to load image`` or
``cv2.error ... !buf.empty()`` without a file name). :func:`image_problem`
reads what it takes to know a file is a whole image: its size, its first
bytes (a known signature), its dimensions from the header (PNG: IHDR;
JPEG: the frame header, found by skipping the segments before it) and its
last bytes (PNG's IEND chunk, JPEG's end-of-image marker). Only a file
that fails one of these is decoded in full, as the pipeline would (OpenCV),
and reported if that fails too. Formats without a header reader here
(TIFF, WebP, ...) are decoded in full.

Cost: an open, a stat and two or three short reads per PNG or JPEG, no
decode; 75-100 us an image on a 2-core machine under load 3-7 with the
files in the page cache, 9-12 s for COCO train 2017's 118k images
(``benchmarks/bench_image_check.py``). Files are read by a few threads at
once: on a cold or network disk most of the time is waiting.
"""
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, List, Optional, Tuple

_PNG = b'\x89PNG\r\n\x1a\n'
_PNG_END = b'\x00\x00\x00\x00IEND\xaeB`\x82'
_JPEG = b'\xff\xd8\xff'
# JPEG start-of-frame markers (they carry the dimensions); not C4 (DHT),
# C8 (JPG), CC (DAC)
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD,
        0xCE, 0xCF}
# other formats OpenCV reads (decoded in full to check them)
_OTHER = (b'BM', b'II*\x00', b'MM\x00*', b'RIFF', b'GIF8', b'\x00\x00\x00\x0cjP',
          b'\x76\x2f\x31\x01', b'#?RADIANCE', b'#?RGBE', b'P1', b'P2', b'P3',
          b'P4', b'P5', b'P6', b'P7', b'Pf', b'PF', b'\x59\xa6\x6a\x95')


def _png_size(head: bytes) -> Optional[Tuple[int, int]]:
    if len(head) < 24 or head[12:16] != b'IHDR':
        return None
    return struct.unpack('>II', head[16:24])


def _jpeg_size(f, head: bytes) -> Optional[Tuple[int, int]]:
    """Walk the segments after SOI to the frame header: in ``head`` (the
    file's first bytes), seeking past segments that end beyond it."""
    buf, base, pos = head, 0, 2  # buf holds the file from offset base
    while True:
        if pos + 9 > base + len(buf):  # a marker, length and frame size
            f.seek(pos)
            buf, base = f.read(4096), pos
            if len(buf) < 4:
                return None
        i = pos - base
        if buf[i] != 0xFF:
            return None
        marker = buf[i + 1]
        if marker == 0xFF:  # a fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # no length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame
            return None
        if marker in _SOF:
            if i + 9 > len(buf):
                return None
            height, width = struct.unpack('>HH', buf[i + 5:i + 9])
            return width, height
        size = struct.unpack('>H', buf[i + 2:i + 4])[0]
        if size < 2:
            return None
        pos += 2 + size


_decoding = threading.Lock()  # OpenCV's log level is global


def _decodes(path: str) -> bool:
    with _decoding:
        return _decodes_quietly(path)


def _decodes_quietly(path: str) -> bool:
    import cv2
    import numpy as np
    with open(path, 'rb') as f:
        data = np.frombuffer(f.read(), np.uint8)
    logging = getattr(cv2, 'utils', None) and getattr(cv2.utils, 'logging',
                                                     None)
    level = logging.getLogLevel() if logging else None
    if logging:  # its warnings about the damage, without a file name
        logging.setLogLevel(logging.LOG_LEVEL_SILENT)
    try:
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error:
        return False
    finally:
        if logging:
            logging.setLogLevel(level)
    return image is not None and image.size > 0


def _decoder_pixel_limit() -> int:
    """The most pixels OpenCV's decoders accept (``CV_IO_MAX_IMAGE_PIXELS``,
    read when the decoder runs; 2^30 by default)."""
    try:
        return int(os.environ.get('CV_IO_MAX_IMAGE_PIXELS', 1 << 30))
    except ValueError:
        return 1 << 30


def image_problem(path: str) -> Optional[str]:
    """Why training could not read the image ``path``, or None."""
    try:
        with open(path, 'rb') as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return 'empty file (0 bytes)'
            head = f.read(4096)
            if head.startswith(_PNG):
                dims = _png_size(head)
                f.seek(max(size - len(_PNG_END), 0))
                whole = f.read() == _PNG_END
                kind = 'PNG'
            elif head.startswith(_JPEG):
                dims = _jpeg_size(f, head)
                f.seek(max(size - 64, 0))
                whole = b'\xff\xd9' in f.read()
                kind = 'JPEG'
            elif head.startswith(_OTHER):
                dims, whole, kind = None, False, 'image'
            else:
                return (f'not an image: no image format starts with '
                        f'{head[:8]!r}')
    except OSError as error:
        return f'cannot be read ({error.strerror or error})'
    if dims is not None and dims[0] * dims[1] > _decoder_pixel_limit():
        return (f'a {kind} file of {dims[0]}x{dims[1]} pixels, more than '
                f'OpenCV decodes ({_decoder_pixel_limit()}, its '
                f'CV_IO_MAX_IMAGE_PIXELS): downscale it, or raise that limit '
                f'in the environment')
    if dims is not None and whole and min(dims) > 0:
        return None
    if _decodes(path):
        return None
    if kind == 'image':
        return 'an image file that cannot be decoded (damaged?)'
    if dims is None:
        return f'a {kind} file whose header is cut short or damaged'
    if min(dims) == 0:
        return f'a {kind} file of {dims[0]}x{dims[1]} pixels'
    return f'a {kind} file cut short or damaged (it cannot be decoded)'


def bad_images(paths: Iterable[str], threads: int = 8
               ) -> List[Tuple[str, str]]:
    """(path, problem) for each of ``paths`` training could not read;
    files are read by a few threads at once (on network file systems most
    of the time is waiting)."""
    paths = list(paths)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        problems = list(pool.map(image_problem, paths, chunksize=256))
    return [(p, why) for p, why in zip(paths, problems) if why is not None]
