"""Image files that training would fail on, found before it starts.

mmdet reads an image only when a dataloader worker first needs it: a file
that is empty, not an image or cut short stops the training there, after
any number of iterations (``AssertionError: failed to load image`` or
``cv2.error ... !buf.empty()`` without a file name). :func:`image_problem`
reads what it takes to know a file is a whole image: its header, through
Pillow (``PIL.Image.open`` is lazy: it identifies the format and reads the
dimensions, and decodes nothing), and, for PNG and JPEG, its last bytes
(PNG's IEND chunk, JPEG's end-of-image marker). A file whose header Pillow
cannot read, a PNG or JPEG without its end, and the formats without an end
marker (TIFF, WebP, ...) are decoded in full, as the pipeline would
(OpenCV), and reported if that fails. A header that declares more pixels
than OpenCV decodes is reported without decoding.

Cost: an open, a stat, Pillow's header read and one short read per PNG or
JPEG, no decode; see ``benchmarks/results/image_check_cpu_2core.md``
(``benchmarks/bench_image_check.py``) for the time per image and for COCO
train 2017's 118k images. Files are read by a few threads at once: on a
cold or network disk most of the time is waiting.
"""
import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, List, Optional, Tuple

from PIL import Image, UnidentifiedImageError

# the last bytes of a whole file, by Pillow's format name (MPO: a JPEG with
# more pictures after the first, as cameras write them)
_PNG_END = b'\x00\x00\x00\x00IEND\xaeB`\x82'
_JPEG_END = b'\xff\xd9'
_ENDS = {'PNG': (len(_PNG_END), lambda tail: tail == _PNG_END),
         'JPEG': (64, lambda tail: _JPEG_END in tail),
         'MPO': (64, lambda tail: _JPEG_END in tail)}
_KIND = {'MPO': 'JPEG'}  # in messages


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


_limit_lock = threading.Lock()
_lifted = 0  # checks under way
_saved_limit: Optional[int] = None


@contextlib.contextmanager
def _any_size():
    """Lift Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``,
    89M pixels: ``Image.open`` refuses twice that) while headers are read:
    nothing is decoded with Pillow, and the limit training meets is
    OpenCV's, checked here. Restored when the last check ends."""
    global _lifted, _saved_limit
    with _limit_lock:
        if not _lifted:
            _saved_limit = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _lifted += 1
    try:
        yield
    finally:
        with _limit_lock:
            _lifted -= 1
            if not _lifted:
                Image.MAX_IMAGE_PIXELS = _saved_limit


def _header(f) -> Tuple[Optional[str], Optional[Tuple[int, int]], str]:
    """(format, (width, height), why not) from Pillow's lazy open of the
    file ``f``: format and size None when Pillow does not know the format
    (why: '') or fails inside its header (why: Pillow's error)."""
    try:
        with Image.open(f) as image:
            return image.format, image.size, ''
    except UnidentifiedImageError:
        return None, None, ''
    except Exception as error:
        # a plugin's OSError ('Truncated File Read'), SyntaxError,
        # struct.error, ...: Pillow knows the format, the header is broken
        return None, None, str(error) or type(error).__name__


def _opencv_reads(path: str) -> bool:
    """Whether OpenCV has a decoder for the file's first bytes (OpenCV
    before 4.5 cannot say: then the decode decides)."""
    import cv2
    have_reader = getattr(cv2, 'haveImageReader', None)
    return have_reader is None or have_reader(path)


def image_problem(path: str) -> Optional[str]:
    """Why training could not read the image ``path``, or None."""
    with _any_size():
        return _image_problem(path)


def _image_problem(path: str) -> Optional[str]:
    try:
        with open(path, 'rb') as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return 'empty file (0 bytes)'
            fmt, dims, damage = _header(f)
            whole = False
            if fmt in _ENDS:
                length, is_end = _ENDS[fmt]
                f.seek(max(size - length, 0))
                whole = is_end(f.read())
            if fmt is None:
                f.seek(0)
                head = f.read(8)
    except OSError as error:
        return f'cannot be read ({error.strerror or error})'
    kind = _KIND.get(fmt, fmt)
    if dims is not None and dims[0] * dims[1] > _decoder_pixel_limit():
        return (f'a {kind} file of {dims[0]}x{dims[1]} pixels, more than '
                f'OpenCV decodes ({_decoder_pixel_limit()}, its '
                f'CV_IO_MAX_IMAGE_PIXELS): downscale it, or raise that limit '
                f'in the environment')
    if dims is not None and whole and min(dims) > 0:
        return None
    if fmt is None and not damage and not _opencv_reads(path):
        return f'not an image: no image format starts with {head!r}'
    if _decodes(path):
        return None
    if damage:
        return (f'an image file whose header is cut short or damaged '
                f'(Pillow: {damage}; it starts with {head!r})')
    if fmt is None:
        return (f'an image file that neither Pillow nor OpenCV can read '
                f'(damaged? it starts with {head!r})')
    if min(dims) == 0:
        return f'a {kind} file of {dims[0]}x{dims[1]} pixels'
    if fmt not in _ENDS:
        return f'a {kind} file that OpenCV cannot decode (damaged?)'
    return f'a {kind} file cut short or damaged (it cannot be decoded)'


def bad_images(paths: Iterable[str], threads: int = 8
               ) -> List[Tuple[str, str]]:
    """(path, problem) for each of ``paths`` training could not read;
    files are read by a few threads at once (on network file systems most
    of the time is waiting)."""
    paths = list(paths)
    with _any_size(), ThreadPoolExecutor(max_workers=threads) as pool:
        problems = list(pool.map(_image_problem, paths, chunksize=256))
    return [(p, why) for p, why in zip(paths, problems) if why is not None]
