"""Datasets over the LMDBs written by prepare_data.py (and by rosinality's stylegan2-pytorch).

- `MultiResolutionDataset`: one resolution of one LMDB, images decoded with PIL, then `transform`.
- `to_tensor` (the trainers' transform, the inference conversion) and `random_flip` (their augmentation).
- `lmdb_problems`: the trainers' up-front check of their LMDBs.
- `InfiniteSampler`, `infinite_loader`, `PairedLoader`: endless, per-rank shuffled batches; BlendGAN
  trains on natural faces (FFHQ) and artistic faces (AAHQ), both at 1024 px (supplementary material),
  drawn here from two LMDBs with independent shuffles.
"""

import io
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from prepare_data import image_key, open_shared_lmdb, stored_length, stored_resolutions
from utils import img2ten


def to_tensor(img):
    """PIL RGB -> [3, H, W] float32 in [-1, 1], the conversion the inference scripts use (utils.img2ten)."""
    return img2ten(np.asarray(img))[0]


def random_flip(x, p=0.5, generator=None):
    """Flip each image of x [N, 3, H, W] horizontally with probability p. The draws come from `generator`
    (a CPU torch.Generator) when given, else from the global RNG of x's device."""
    if p <= 0:
        return x
    if generator is None:
        u = torch.rand(x.shape[0], device=x.device)
    else:
        u = torch.rand(x.shape[0], generator=generator).to(x.device)
    return torch.where((u < p).view(-1, 1, 1, 1), x.flip(3), x)  # [N, 3, H, W]


def lmdb_length(path, resolution=None):
    """The image count of a finished LMDB folder; FileNotFoundError when ``path`` holds no LMDB, ValueError
    when it is unfinished or (``resolution`` given) has no images at ``resolution``."""
    with open_shared_lmdb(path).begin() as txn:
        length = stored_length(txn)
        if length is None:
            raise ValueError(f"{path} has no b'length' key: not a finished LMDB "
                             '(was prepare_data.py interrupted?)')
        if resolution is not None and length > 0 and txn.get(image_key(resolution, 0)) is None:
            raise ValueError(f'{path} holds no images at resolution {resolution}; '
                             f'it has {stored_resolutions(txn)}')
    return length


class MultiResolutionDataset(Dataset):
    """Images of one `resolution` from an LMDB in stylegan2-pytorch's layout.

    The LMDB is opened read-only, without a lock, on first access in each process, so every DataLoader
    worker has its own handle (LMDB handles must not cross a fork); see `open_shared_lmdb`.
    """

    def __init__(self, path, transform=None, resolution=256):
        self.path = path
        self.transform = transform
        self.resolution = resolution
        self._env = None
        self._env_pid = None
        self.length = lmdb_length(path, resolution)

    def _env_for_this_process(self):
        if self._env is None or self._env_pid != os.getpid():
            self._env = open_shared_lmdb(self.path)
            self._env_pid = os.getpid()
        return self._env

    def __getstate__(self):
        state = self.__dict__.copy()
        state['_env'] = None
        state['_env_pid'] = None
        return state

    def __len__(self):
        return self.length

    def read_bytes(self, index):
        """The stored (encoded) bytes of image `index`."""
        if not 0 <= index < self.length:
            raise IndexError(f'index {index} out of range for {self.length} images in {self.path}')
        key = image_key(self.resolution, index)
        with self._env_for_this_process().begin(write=False) as txn:
            data = txn.get(key)
        if data is None:
            raise KeyError(f'{self.path} has no key {key.decode()} although its length is {self.length}: '
                           'the LMDB is incomplete or corrupt')
        return data

    def read_image(self, index):
        """Image `index` decoded to an RGB PIL image, before `transform`."""
        with Image.open(io.BytesIO(self.read_bytes(index))) as img:
            return img.convert('RGB')

    def __getitem__(self, index):
        img = self.read_image(index)
        return self.transform(img) if self.transform is not None else img


def lmdb_problems(lmdbs, size=None):
    """What is wrong with each LMDB [(what, path)] read at resolution ``size`` (None: any): a missing
    folder, a folder without an LMDB, an unfinished or empty LMDB, no images at ``size``. One line per
    unusable LMDB (empty list when all are usable); the trainers' validate() calls this before any model
    is built."""
    problems = []
    for what, path in lmdbs:
        if not os.path.isdir(path):
            problems.append(f"{what} {path}: no such folder (make it with prepare_data.py)")
            continue
        try:
            n = lmdb_length(path, size)
        except FileNotFoundError:
            problems.append(f"{what} {path}: not an LMDB (no data.mdb; make one with prepare_data.py)")
            continue
        except Exception as e:  # lmdb.Error and lmdb_length's ValueErrors alike: one line for the user
            text = str(e) if str(e).startswith(path) else f"{path}: {e}"
            problems.append(f"{what} {text}" + ("" if size is None else f" (--size {size})"))
            continue
        if n == 0:
            problems.append(f"{what} {path}: holds no images")
    return problems


class InfiniteSampler(Sampler):
    """Endless indices: a new permutation every epoch (seeded), each rank taking every world_size-th.

    start: how many of this rank's indices to skip, so that a resumed run continues the stream exactly
    where a checkpoint left it (e.g. iteration * batch size).
    """

    def __init__(self, dataset_size, rank=0, world_size=1, shuffle=True, seed=0, start=0):
        if dataset_size < 1:
            raise ValueError('InfiniteSampler needs a non-empty dataset')
        if not 0 <= rank < world_size:
            raise ValueError(f'rank {rank} outside world size {world_size}')
        if start < 0:
            raise ValueError(f'start must be >= 0, got {start}')
        self.dataset_size = dataset_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.start = start

    def __iter__(self):
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        skip = self.start
        while True:
            if self.shuffle:
                order = torch.randperm(self.dataset_size, generator=generator)
            else:
                order = torch.arange(self.dataset_size)
            mine = order[self.rank::self.world_size]
            if skip >= len(mine):  # a whole epoch before the start: draw its permutation, yield nothing
                skip -= len(mine)
                continue
            yield from mine[skip:].tolist()
            skip = 0


def infinite_loader(dataset, batch_size, num_workers=0, seed=0, rank=0, world_size=1, shuffle=True,
                    pin_memory=False, start=0):
    """An endless iterator of batches of `dataset` (InfiniteSampler under a DataLoader).

    start: this rank's samples to skip (see InfiniteSampler), e.g. iteration * batch_size on resume.
    """
    sampler = InfiniteSampler(len(dataset), rank, world_size, shuffle, seed, start)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        pin_memory=pin_memory, drop_last=True, persistent_workers=num_workers > 0)
    return iter(loader)


class PairedLoader:
    """Endless (natural batch, artistic batch) pairs for BlendGAN: two loaders, independent shuffles.

    The two streams are seeded 2 * seed and 2 * seed + 1, so neither order depends on the other and
    the datasets may have different sizes. start_batch: batches already consumed (resume), skipped in
    both streams.
    """

    def __init__(self, natural, artistic, batch_size, num_workers=0, seed=0, rank=0, world_size=1,
                 pin_memory=False, start_batch=0):
        start = start_batch * batch_size
        self.natural = infinite_loader(natural, batch_size, num_workers, 2 * seed, rank, world_size,
                                       pin_memory=pin_memory, start=start)
        self.artistic = infinite_loader(artistic, batch_size, num_workers, 2 * seed + 1, rank, world_size,
                                        pin_memory=pin_memory, start=start)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.natural), next(self.artistic)
