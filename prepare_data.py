"""Pack image folders into an LMDB in the layout of rosinality's stylegan2-pytorch.

    python prepare_data.py --out LMDB --size 256,1024 --n_worker N FOLDER [FOLDER ...]

Layout (documented by stylegan2-pytorch's prepare_data.py / dataset.py, kept so that LMDBs made by
either tool load in both):
    f'{size}-{str(index).zfill(5)}'.encode('utf-8') -> encoded image bytes (JPEG or PNG)
    b'length'                                       -> str(n).encode('utf-8')
Each image is resized so that its shorter side is `size` and centre-cropped to size x size.

The LMDB is built in a temporary folder beside --out and moved into place only when complete, and
b'length' is written last: an interrupted run leaves no half-written --out, and a rerun over a
finished LMDB leaves it untouched unless --overwrite is given.
"""

import argparse
import errno
import multiprocessing
import os
import re
import shutil
import sys
import uuid
from dataclasses import dataclass, field

import lmdb
from PIL import Image
from tqdm import tqdm

from fileio import (DiskFullError, disk_full_named, exit_on_sigterm, free_bytes, pool_worker_sigterm,
                    remove_dead_temporaries, temporary_path)
from imageio_utils import MIN_SIDE, UnreadableImageError, encode_image, list_images, read_image_rgb, size_problem

RESAMPLE = {'lanczos': Image.Resampling.LANCZOS, 'bilinear': Image.Resampling.BILINEAR,
            'bicubic': Image.Resampling.BICUBIC}
LENGTH_KEY = b'length'
WRITE_BATCH = 64  # images per LMDB write transaction
MAP_SIZE_HEADROOM = 1.25  # over the raw-pixel bound, for PNG/JPEG container overhead and B-tree pages
MAP_SIZE_MIN = 64 * 2 ** 20


def image_key(size, index):
    """The stylegan2-pytorch key of image `index` at resolution `size`."""
    return f'{size}-{str(index).zfill(5)}'.encode('utf-8')


def resize_and_center_crop(img, size, resample=Image.Resampling.LANCZOS):
    """Scale so that the shorter side is `size`, then cut the central size x size square."""
    width, height = img.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new_size != img.size:
        img = img.resize(new_size, resample)
    left = (new_size[0] - size) // 2
    top = (new_size[1] - size) // 2
    if new_size != (size, size):
        img = img.crop((left, top, left + size, top + size))
    return img


def encode_resized(img, sizes, resample, image_format, quality):
    """Encoded bytes of `img` at each size, each resized from the full-resolution image."""
    return [encode_image(resize_and_center_crop(img, s, resample), image_format, quality) for s in sizes]


def _encode_file(task):
    """Worker: (path, sizes, resample, format, quality) -> (path, [bytes per size] or None, error or None,
    whether the image is smaller than the largest size, i.e. upscaled)."""
    path, sizes, resample, image_format, quality = task
    try:
        img = read_image_rgb(path)
    except UnreadableImageError as error:
        return path, None, str(error), False
    # a face fits in 32 px; smaller packs (tests) take what reaches their size
    problem = size_problem(*img.size, least=min(MIN_SIDE, *sizes))
    if problem:
        return path, None, f'{path}: {problem}', False
    return path, encode_resized(img, sizes, RESAMPLE[resample], image_format, quality), None, min(img.size) < max(sizes)


def parse_sizes(text):
    try:
        sizes = tuple(int(s) for s in text.split(',') if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f'--size must be comma-separated integers, got {text!r}')
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f'--size must list positive integers, got {text!r}')
    return tuple(sorted(set(sizes)))


def parse_bytes(text):
    """'1099511627776', '500M', '64G', '1T' -> bytes."""
    match = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)i?[bB]?\s*', text)
    if not match:
        raise argparse.ArgumentTypeError(f'cannot read a byte count from {text!r} (e.g. 500M, 64G, 1T)')
    power = ' KMGT'.index(match.group(2).upper() or ' ')
    return int(float(match.group(1)) * 1024 ** power)


def estimated_map_size(n_images, sizes):
    """An upper bound of the LMDB size from raw 8-bit RGB pixels (PNG/JPEG rarely exceed it)."""
    raw = n_images * sum(3 * s * s for s in sizes)
    return max(MAP_SIZE_MIN, int(raw * MAP_SIZE_HEADROOM))


def open_lmdb_readonly(path):
    """Open an existing LMDB folder for reading only, without the lock file."""
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, 'data.mdb')):
        raise FileNotFoundError(f'{path} is not an LMDB folder (no data.mdb inside)')
    return lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False, max_readers=126)


# (st_dev, st_ino) of an LMDB's data.mdb -> (pid that opened it, read-only lmdb.Environment)
_OPEN_ENVS = {}


def open_shared_lmdb(path):
    """A read-only handle to the LMDB folder `path`, shared by all readers in this process.

    py-lmdb refuses to open the same files twice in one process, and LMDB forbids using a handle
    inherited through fork, so handles are kept per file and per process: a forked child (a DataLoader
    worker) closes its inherited copy, which leaves the parent's untouched, and opens its own.
    """
    try:
        stat = os.stat(os.path.join(path, 'data.mdb'))
    except OSError as error:
        raise FileNotFoundError(f'cannot open LMDB {path}: {error}') from error
    key = (stat.st_dev, stat.st_ino)
    pid, env = _OPEN_ENVS.get(key, (None, None))
    if env is not None and pid == os.getpid():
        return env
    if env is not None:
        env.close()
    env = open_lmdb_readonly(path)
    _OPEN_ENVS[key] = (os.getpid(), env)
    return env


def stored_length(txn):
    """The image count under b'length', or None when the key is absent (an unfinished LMDB)."""
    value = txn.get(LENGTH_KEY)
    return None if value is None else int(value.decode('utf-8'))


def stored_resolutions(txn):
    """Resolutions present in an LMDB, found by jumping over each '{size}-' block of sorted keys."""
    sizes = []
    cursor = txn.cursor()
    found = cursor.first()
    while found:
        match = re.fullmatch(rb'(\d+)-\d+', cursor.key())
        if match is None:
            found = cursor.next()
            continue
        sizes.append(int(match.group(1)))
        # '.' follows '-' in byte order, so this lands on the first key after the whole block.
        found = cursor.set_range(match.group(1) + b'.')
    return sorted(sizes)


def lmdb_status(path):
    """('missing' | 'complete' | 'incomplete' | 'not_lmdb', length or None, resolutions)."""
    if not os.path.exists(path):
        return 'missing', None, []
    try:
        env = open_shared_lmdb(path)
    except FileNotFoundError:
        return 'not_lmdb', None, []
    except lmdb.Error as error:
        raise ValueError(f'{path} cannot be opened as an LMDB: {error}') from error
    with env.begin() as txn:
        length = stored_length(txn)
        resolutions = stored_resolutions(txn)
    return ('complete' if length is not None else 'incomplete'), length, resolutions


def _looks_like_lmdb_folder(path):
    return os.path.isdir(path) and set(os.listdir(path)) <= {'data.mdb', 'lock.mdb'}


@dataclass
class PrepareOptions:
    out: str
    paths: list
    size: tuple = (128, 256, 512, 1024)
    n_worker: int = 8
    resample: str = 'lanczos'
    format: str = 'jpeg'
    quality: int = 100
    map_size: int = None
    overwrite: bool = False


@dataclass
class PackSummary:
    status: str  # 'written' or 'kept' (a finished LMDB was already there)
    length: int
    resolutions: list
    skipped: list = field(default_factory=list)  # messages naming each undecodable or too small file
    upscaled: int = 0  # images whose shorter side is below the largest size


def raise_if_disk_full(error, path, need=0):
    """An lmdb.Error that means the disk under ``path`` is full, as the OSError it stands for (prepare's
    fileio.disk_full_named names --out): ENOSPC itself (lmdb.DiskError), a quota (py-lmdb has no class for
    EDQUOT: its message), or a short write, which LMDB reports as EIO ('Input/output error'), with less room
    left than the ``need`` bytes being written and a MiB for pages."""
    if os.strerror(errno.EDQUOT) in str(error):
        raise OSError(errno.EDQUOT, f'{error} (over the disk quota)', path) from error
    if isinstance(error, lmdb.DiskError) or free_bytes(path) < need + 2 ** 20:
        raise OSError(errno.ENOSPC, f'{error} (the disk is full)', path) from error


class _LmdbWriter:
    """Batched puts into a fresh LMDB; grows an automatic map size, or explains a too small --map_size."""

    def __init__(self, path, map_size, fixed_map_size, label, suggested_map_size):
        self.path = path
        self.label = label
        self.fixed = fixed_map_size
        self.suggested = suggested_map_size
        # no lock file: only this writer uses the fresh folder, and LMDB's memory-mapped lock file is a SIGBUS (the
        # process killed without a word) on a disk too full to hold its first page
        try:
            self.env = lmdb.open(path, map_size=map_size, lock=False, readahead=False, meminit=False, map_async=False)
        except lmdb.Error as error:
            raise_if_disk_full(error, path)
            raise
        self.pending = []
        self.written = 0

    def put(self, key, value):
        self.pending.append((key, value))
        self.written += len(value)

    def flush(self):
        while self.pending:
            try:
                with self.env.begin(write=True) as txn:
                    for key, value in self.pending:
                        txn.put(key, value)
                self.pending = []
            except lmdb.MapFullError:
                map_size = self.env.info()['map_size']
                if self.fixed:
                    raise ValueError(
                        f'--map_size {map_size} bytes is too small for {self.label}: {self.written} bytes '
                        f'of images so far. Rerun with a larger --map_size (the raw-pixel bound for this '
                        f'data is {self.suggested}) or leave it out to size the LMDB automatically.'
                    ) from None
                self.env.set_mapsize(2 * map_size)
            except lmdb.Error as error:
                raise_if_disk_full(error, self.path, sum(len(key) + len(value) for key, value in self.pending))
                raise

    def sync(self):
        self.env.sync(True)

    def close(self):
        """Close; puts not yet flushed are dropped (an error is on its way)."""
        self.env.close()


def gather_paths(folders):
    """Image files of each folder (recursive, sorted), in the order the folders are given, without repeats."""
    seen = set()
    paths = []
    for folder in folders:
        for path in list_images(folder):
            real = os.path.realpath(path)
            if real not in seen:
                seen.add(real)
                paths.append(path)
    return paths


def _encoded_stream(tasks, n_worker):
    if n_worker <= 1:
        yield from map(_encode_file, tasks)
        return
    with multiprocessing.Pool(n_worker, pool_worker_sigterm) as pool:
        # imap keeps the input order, so indices follow the sorted file list whatever the timing.
        yield from pool.imap(_encode_file, tasks, chunksize=4)


def _write_lmdb(tmp_path, paths, options):
    estimate = estimated_map_size(len(paths), options.size)
    writer = _LmdbWriter(tmp_path, options.map_size or estimate, options.map_size is not None,
                         options.out, estimate)
    skipped = []
    index = upscaled = 0
    tasks = [(p, options.size, options.resample, options.format, options.quality) for p in paths]
    stream = _encoded_stream(tasks, options.n_worker)
    try:
        for _, encoded, error, small in tqdm(stream, total=len(tasks), unit='img',
                                             desc=f'packing {os.path.basename(options.out)}'):
            if encoded is None:
                skipped.append(error)
                continue
            upscaled += small
            for size, data in zip(options.size, encoded):
                writer.put(image_key(size, index), data)
            index += 1
            if index % WRITE_BATCH == 0:
                writer.flush()
        if index == 0:
            raise ValueError(f'none of the {len(paths)} files could be used, nothing written: '
                             + '; '.join(skipped[:3]) + ('; ...' if len(skipped) > 3 else ''))
        # Written last: a reader that finds b'length' finds every image before it.
        writer.flush()
        writer.put(LENGTH_KEY, str(index).encode('utf-8'))
        writer.flush()
        writer.sync()
    finally:
        stream.close()  # stops the worker pool at once if an error ends the loop early
        writer.close()
    return index, skipped, upscaled


def _move_into_place(tmp_path, out):
    if os.path.exists(out):
        old = f'{out}.old-{uuid.uuid4().hex[:8]}'
        os.rename(out, old)
        os.rename(tmp_path, out)
        shutil.rmtree(old)
    else:
        os.rename(tmp_path, out)


def prepare(options):
    """Build options.out from options.paths; returns a PackSummary."""
    status, length, resolutions = lmdb_status(options.out)
    if status == 'complete' and not options.overwrite:
        missing = sorted(set(options.size) - set(resolutions))
        if missing:
            raise ValueError(f'{options.out} is a finished LMDB with resolutions {resolutions}, without '
                             f'{missing}; pass --overwrite to rebuild it or choose another --out')
        return PackSummary('kept', length, resolutions)
    if status == 'incomplete' and not options.overwrite:
        raise ValueError(f'{options.out} is an LMDB without a {LENGTH_KEY!r} key (an interrupted run?); '
                         'pass --overwrite to rebuild it')
    if status == 'not_lmdb' and not (options.overwrite and _looks_like_lmdb_folder(options.out)):
        raise ValueError(f'{options.out} exists and is not an LMDB; choose another --out')

    paths = gather_paths(options.paths)
    if not paths:
        raise ValueError(f'no image files found in {", ".join(options.paths)}')

    out = os.path.abspath(options.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    for stale in remove_dead_temporaries(os.path.dirname(out), os.path.basename(out)):
        print(f'removed {stale}: the unfinished LMDB of an earlier run that was killed')
    tmp_path = temporary_path(out)
    # a full disk: the next run starts over (an LMDB in the making is not resumed); --out stays as it was
    with disk_full_named(options.out, f'{options.out} was left as it was and the unfinished LMDB removed'):
        try:
            count, skipped, upscaled = _write_lmdb(tmp_path, paths, options)
            _move_into_place(tmp_path, out)
        finally:
            if os.path.exists(tmp_path):
                shutil.rmtree(tmp_path)
    return PackSummary('written', count, list(options.size), skipped, upscaled)


def report(summary, options):
    if summary.status == 'kept':
        print(f'{options.out} is already a finished LMDB ({summary.length} images at {summary.resolutions}); '
              'left as it is (pass --overwrite to rebuild it)')
        return
    print(f'packed {summary.length} images at sizes {summary.resolutions} into {options.out}')
    if summary.upscaled:
        print(f'{summary.upscaled} of them smaller than {max(summary.resolutions)} px (shorter side), upscaled')
    if summary.skipped:
        print(f'skipped {len(summary.skipped)} undecodable or too small files:')
        for message in summary.skipped:
            print(f'  {message}')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Pack image folders into an LMDB (stylegan2-pytorch's layout).")
    parser.add_argument('--out', required=True, help='LMDB folder to create')
    parser.add_argument('--size', type=parse_sizes, default=(128, 256, 512, 1024),
                        help='comma-separated resolutions to store, e.g. 256,1024')
    parser.add_argument('--n_worker', type=int, default=8, help='decoding and resizing processes')
    parser.add_argument('--resample', choices=sorted(RESAMPLE), default='lanczos', help='resize filter')
    parser.add_argument('--format', choices=('jpeg', 'png'), default='jpeg',
                        help='encoding of the stored images (png is lossless)')
    parser.add_argument('--quality', type=int, default=100, help='JPEG quality (1-100)')
    parser.add_argument('--map_size', type=parse_bytes, default=None,
                        help='LMDB map size, e.g. 64G; default: estimated from the image count and grown '
                             'as needed')
    parser.add_argument('--overwrite', action='store_true', help='rebuild --out if it already exists')
    parser.add_argument('paths', nargs='+', metavar='FOLDER', help='image folders (searched recursively)')
    args = parser.parse_args(argv)
    for path in args.paths:
        if not os.path.isdir(path):
            parser.error(f'{path} is not a folder')
    if not 1 <= args.quality <= 100:
        parser.error('--quality must be between 1 and 100')
    if args.n_worker < 0:
        parser.error('--n_worker must be >= 0')
    if args.map_size is not None and args.map_size < 2 ** 16:
        parser.error('--map_size must be at least 64K')
    return PrepareOptions(**vars(args))


def main(argv=None):
    options = parse_args(argv)
    try:
        with exit_on_sigterm():  # stopped by a scheduler: cleaned up as after Ctrl-C
            summary = prepare(options)
    except ValueError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    except DiskFullError as error:
        print(f'error: {error}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f'interrupted: {options.out} was left as it was', file=sys.stderr)
        return 130
    report(summary, options)
    return 0


if __name__ == '__main__':
    sys.exit(main())
