"""imageio_utils decoding, prepare_data.py packing and the dataset classes, on the real test images."""

import hashlib
import io
import multiprocessing
import os
import pickle
import shutil
import signal
import subprocess
import sys

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import prepare_data
from fileio import process_space
from dataset import InfiniteSampler, MultiResolutionDataset, PairedLoader, random_flip
from imageio_utils import UnreadableImageError, list_images, read_image_rgb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_IMGS = os.path.join(ROOT, 'test_imgs')
FACE = os.path.join(TEST_IMGS, 'face_imgs', '000000.jpg')


def _pixels(img):
    return np.asarray(img, dtype=np.uint8)


def _reference_resized(path, size):
    """Independent reference: decode, drop to RGB, resize the square 512 px test image with Lanczos."""
    with Image.open(path) as img:
        assert img.size[0] == img.size[1]
        return _pixels(img.convert('RGB').resize((size, size), Image.Resampling.LANCZOS))


def _dir_digest(path):
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name == 'lock.mdb':
            continue
        with open(os.path.join(path, name), 'rb') as f:
            digest.update(name.encode() + f.read())
    return digest.hexdigest()


def _write_lmdb(path, items):
    env = lmdb.open(path, map_size=2 ** 26)
    with env.begin(write=True) as txn:
        for key, value in items:
            txn.put(key, value)
    env.close()


def _png_bytes(arr):
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format='PNG')
    return buffer.getvalue()


# ---- decoding -----------------------------------------------------------------------------------

def test_read_image_modes(tmp_path):
    rgb = _pixels(Image.open(FACE).convert('RGB').resize((48, 40)))  # [40, 48, 3]
    gray = _pixels(Image.fromarray(rgb).convert('L'))  # [40, 48]

    Image.fromarray(gray).save(tmp_path / 'l.png')
    out = read_image_rgb(str(tmp_path / 'l.png'))
    assert out.mode == 'RGB' and out.size == (48, 40)
    np.testing.assert_array_equal(_pixels(out), np.repeat(gray[:, :, None], 3, axis=2))

    # 16-bit grey: 65535 is white, 257 * v is v.
    deep = (gray.astype(np.uint16) * 257)
    deep[0, 0] = 65535
    Image.fromarray(deep).save(tmp_path / 'i16.png')
    with Image.open(tmp_path / 'i16.png') as probe:
        assert probe.mode.startswith('I')
    expected = gray.copy()
    expected[0, 0] = 255
    np.testing.assert_array_equal(_pixels(read_image_rgb(str(tmp_path / 'i16.png')))[:, :, 1], expected)

    # RGBA: transparent -> white, opaque -> colour, half -> blend.
    alpha = np.full(gray.shape, 255, np.uint8)
    alpha[:, :16] = 0
    alpha[:, 16:32] = 128
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / 'rgba.png')
    out = _pixels(read_image_rgb(str(tmp_path / 'rgba.png'))).astype(int)
    assert (out[:, :16] == 255).all()
    np.testing.assert_array_equal(out[:, 32:], rgb[:, 32:])
    blend = (rgb[:, 16:32].astype(float) * 128 + 255 * 127) / 255
    assert np.abs(out[:, 16:32] - blend).max() <= 1

    # Palette with a transparent index.
    palette_img = Image.fromarray(rgb).quantize(colors=16)
    palette_img.info['transparency'] = 0
    palette_img.save(tmp_path / 'p.png', transparency=0)
    out = _pixels(read_image_rgb(str(tmp_path / 'p.png')))
    index = np.asarray(palette_img)
    palette_rgb = _pixels(palette_img.convert('RGB'))
    assert (out[index == 0] == 255).all()
    np.testing.assert_array_equal(out[index != 0], palette_rgb[index != 0])

    # CMYK JPEG: pure cyan and pure black patches.
    cmyk = np.zeros((16, 32, 4), np.uint8)
    cmyk[:, :16, 0] = 255
    cmyk[:, 16:, 3] = 255
    Image.fromarray(cmyk, 'CMYK').save(tmp_path / 'cmyk.jpg', quality=98)
    out = _pixels(read_image_rgb(str(tmp_path / 'cmyk.jpg'))).astype(int)
    assert np.abs(out[4:12, 4:12] - [0, 255, 255]).max() <= 8
    assert np.abs(out[4:12, 20:28]).max() <= 8

    # Lossless WebP.
    Image.fromarray(rgb).save(tmp_path / 'x.webp', lossless=True)
    np.testing.assert_array_equal(_pixels(read_image_rgb(str(tmp_path / 'x.webp'))), rgb)

    # EXIF orientation 6: stored image must be turned 90 degrees clockwise for display.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(tmp_path / 'rot.png', exif=exif)
    out = read_image_rgb(str(tmp_path / 'rot.png'))
    np.testing.assert_array_equal(_pixels(out), np.rot90(rgb, k=-1))


def test_unreadable_files_are_named(tmp_path):
    (tmp_path / 'text.jpg').write_bytes(b'this is not an image')
    with open(FACE, 'rb') as f:
        (tmp_path / 'truncated.jpg').write_bytes(f.read()[:3000])
    (tmp_path / 'empty.webp').write_bytes(b'')
    for name in ('text.jpg', 'truncated.jpg', 'empty.webp'):
        with pytest.raises(UnreadableImageError, match=name):
            read_image_rgb(str(tmp_path / name))


def test_list_images_recursive_sorted(tmp_path):
    for rel in ('b.png', 'a.JPG', 'sub/c.webp', 'sub/.hidden.png', '.git/d.png', 'notes.txt'):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b'x')
    found = [os.path.relpath(p, tmp_path) for p in list_images(str(tmp_path))]
    assert found == ['a.JPG', 'b.png', os.path.join('sub', 'c.webp')]


def test_list_images_follows_each_linked_folder_once(tmp_path):
    """A link to an ancestor (a loop) listed every image at every depth, 41 times (two such links: a walk that
    did not finish); a second link to a listed folder gave its images twice."""
    for rel in ('a/x.jpg', 'b/y.png'):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b'x')
    os.symlink('..', tmp_path / 'a' / 'up')
    os.symlink(tmp_path / 'b', tmp_path / 'c')
    found = [os.path.relpath(p, tmp_path) for p in list_images(str(tmp_path))]
    assert found == [os.path.join('a', 'x.jpg'), os.path.join('b', 'y.png')]


# ---- packing ------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def packed_png(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('lmdb') / 'test_imgs.lmdb')
    rc = prepare_data.main(['--out', out, '--size', '64,32', '--format', 'png', '--n_worker', '2', TEST_IMGS])
    assert rc == 0
    return out


def test_pack_layout_matches_stylegan2(packed_png):
    sources = list_images(TEST_IMGS)
    assert len(sources) == 39
    with prepare_data.open_shared_lmdb(packed_png).begin() as txn:
        keys = {bytes(k) for k, _ in txn.cursor()}
        assert txn.get(b'length') == b'39'
        png = txn.get(f'{64}-{str(0).zfill(5)}'.encode('utf-8'))
    expected = {b'length'} | {f'{s}-{str(i).zfill(5)}'.encode('utf-8') for s in (32, 64) for i in range(39)}
    assert keys == expected
    assert png[:8] == b'\x89PNG\r\n\x1a\n'


def test_png_round_trip_through_dataloader(packed_png):
    sources = list_images(TEST_IMGS)
    for size in (32, 64):
        dataset = MultiResolutionDataset(packed_png, transforms.PILToTensor(), size)
        assert len(dataset) == 39
        loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=2, shuffle=False)
        batches = torch.cat(list(loader))  # [39, 3, size, size] uint8
        assert batches.shape == (39, 3, size, size) and batches.dtype == torch.uint8
        for i, path in enumerate(sources):
            expected = torch.from_numpy(_reference_resized(path, size).copy()).permute(2, 0, 1)
            assert torch.equal(batches[i], expected), path


def test_resolution_not_in_lmdb(packed_png):
    with pytest.raises(ValueError, match=r'resolution 256.*\[32, 64\]'):
        MultiResolutionDataset(packed_png, None, 256)
    with pytest.raises(FileNotFoundError, match='nowhere'):
        MultiResolutionDataset(packed_png + '.nowhere', None, 32)


def test_rerun_leaves_finished_lmdb_intact(packed_png, capsys):
    before = _dir_digest(packed_png)
    mtime = os.path.getmtime(os.path.join(packed_png, 'data.mdb'))
    rc = prepare_data.main(['--out', packed_png, '--size', '64,32', '--format', 'jpeg', '--n_worker', '2',
                            os.path.join(TEST_IMGS, 'face_imgs')])
    assert rc == 0
    assert 'already a finished LMDB' in capsys.readouterr().out
    assert _dir_digest(packed_png) == before
    assert os.path.getmtime(os.path.join(packed_png, 'data.mdb')) == mtime
    # Asking for a resolution it lacks is an error, still without touching it.
    assert prepare_data.main(['--out', packed_png, '--size', '128', '--n_worker', '0', TEST_IMGS]) == 2
    assert _dir_digest(packed_png) == before
    assert not [n for n in os.listdir(os.path.dirname(packed_png)) if '.tmp-' in n or '.old-' in n]


def test_skipped_files_counted_and_indices_contiguous(tmp_path, capsys):
    folder = tmp_path / 'mixed'
    (folder / 'sub').mkdir(parents=True)
    good = sorted(os.listdir(os.path.join(TEST_IMGS, 'face_imgs')))[:3]
    shutil.copy(os.path.join(TEST_IMGS, 'face_imgs', good[0]), folder / 'a.jpg')
    (folder / 'b_bad.jpg').write_bytes(b'\xff\xd8 not really a jpeg')
    shutil.copy(os.path.join(TEST_IMGS, 'face_imgs', good[1]), folder / 'c.jpg')
    with open(os.path.join(TEST_IMGS, 'face_imgs', good[2]), 'rb') as f:
        (folder / 'sub' / 'd_truncated.jpg').write_bytes(f.read()[:2000])
    Image.open(os.path.join(TEST_IMGS, 'face_imgs', good[2])).save(folder / 'sub' / 'e.webp', lossless=True)
    (folder / 'sub' / 'f_empty.png').write_bytes(b'')
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (31, 200, 3), dtype=np.uint8)).save(folder / 'g_tiny.png')  # not a face
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / 'h_small.png')  # upscaled to 64
    out = str(tmp_path / 'mixed.lmdb')

    options = prepare_data.parse_args(['--out', out, '--size', '32,64', '--format', 'png', '--n_worker', '2',
                                       str(folder)])
    summary = prepare_data.prepare(options)
    assert summary.length == 4 and len(summary.skipped) == 4 and summary.upscaled == 1
    for name in ('b_bad.jpg', 'd_truncated.jpg', 'f_empty.png', 'g_tiny.png'):
        assert any(name in message for message in summary.skipped)
    assert any('g_tiny.png: too small for a face image (200x31 px, need >= 32)' in m for m in summary.skipped)

    dataset = MultiResolutionDataset(out, None, 32)
    assert len(dataset) == 4
    sources = [folder / 'a.jpg', folder / 'c.jpg', folder / 'h_small.png', folder / 'sub' / 'e.webp']
    for i, path in enumerate(sources):
        np.testing.assert_array_equal(_pixels(dataset[i]), _reference_resized(path, 32))
    with pytest.raises(IndexError):
        dataset[4]

    prepare_data.report(summary, options)
    printed = capsys.readouterr().out
    assert 'skipped 4 undecodable or too small files' in printed and 'd_truncated.jpg' in printed
    assert '1 of them smaller than 64 px (shorter side), upscaled' in printed


def test_size_limits_are_inclusive(tmp_path):
    """'need >= 32' takes a 32 px image; an image exactly at the largest pack size is not 'upscaled'."""
    from imageio_utils import size_problem

    assert size_problem(32, 40) is None and size_problem(40, 32) is None
    assert size_problem(31, 40) == 'too small for a face image (31x40 px, need >= 32)'
    rng = np.random.default_rng(2)
    for width, upscaled in ((64, False), (63, True)):
        path = tmp_path / f'{width}.png'
        Image.fromarray(rng.integers(0, 256, (80, width, 3), dtype=np.uint8)).save(path)
        _, encoded, error, flag = prepare_data._encode_file((str(path), [32, 64], 'lanczos', 'png', 100))
        assert error is None and len(encoded) == 2 and flag is upscaled, width


def test_small_images_fit_small_packs_and_a_folder_of_nothing_usable_says_why(tmp_path):
    """The 32 px minimum is for faces; a pack at 8/16 px takes 24 px images. When nothing can be packed the
    error gives the files' reasons, not 'could not be decoded' for images that decoded."""
    rng = np.random.default_rng(1)
    folder = tmp_path / 'thumbs'
    folder.mkdir()
    for name in ('a.png', 'b.png'):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / name)
    small = prepare_data.prepare(prepare_data.parse_args(['--out', str(tmp_path / 'small'), '--size', '8,16',
                                                          '--format', 'png', '--n_worker', '0', str(folder)]))
    assert small.length == 2 and not small.skipped and small.upscaled == 0
    with pytest.raises(ValueError, match=r'none of the 2 files could be used, nothing written: .*a\.png: too small '
                                         r'for a face image \(24x24 px, need >= 32\); .*b\.png: too small'):
        prepare_data.prepare(prepare_data.parse_args(['--out', str(tmp_path / 'big'), '--size', '64', '--format', 'png',
                                                      '--n_worker', '0', str(folder)]))
    assert not os.path.exists(tmp_path / 'big')


def test_jpeg_multiple_folders_and_non_square(tmp_path):
    wide = tmp_path / 'wide'
    wide.mkdir()
    face = Image.open(FACE).convert('RGB')
    canvas = Image.new('RGB', (768, 512), (0, 0, 255))
    canvas.paste(face, (128, 0))  # face in the middle, blue bands left and right
    canvas.save(wide / 'wide.png')
    out = str(tmp_path / 'two.lmdb')
    assert prepare_data.main(['--out', out, '--size', '64', '--quality', '95', '--n_worker', '0',
                              str(wide), os.path.join(TEST_IMGS, 'unaligned')]) == 0
    dataset = MultiResolutionDataset(out, transforms.PILToTensor(), 64)
    assert len(dataset) == 2
    with prepare_data.open_shared_lmdb(out).begin() as txn:
        assert txn.get(b'64-00000')[:2] == b'\xff\xd8'
    
    # Shorter side to 64, centre crop: exactly the face square, blue bands cut away.
    expected = _reference_resized(FACE, 64).astype(float)
    got = dataset[0].permute(1, 2, 0).numpy().astype(float)
    psnr = 10 * np.log10(255 ** 2 / np.mean((got - expected) ** 2))
    assert psnr > 30
    astronaut = _reference_resized(os.path.join(TEST_IMGS, 'unaligned', 'astronaut.png'), 64).astype(float)
    assert np.abs(dataset[1].permute(1, 2, 0).numpy() - astronaut).mean() < 3


def test_map_size_too_small_is_a_clear_error(tmp_path, capsys):
    out = str(tmp_path / 'tiny.lmdb')
    rc = prepare_data.main(['--out', out, '--size', '64', '--format', 'png', '--map_size', '64K',
                            '--n_worker', '0', os.path.join(TEST_IMGS, 'face_imgs')])
    assert rc == 2
    assert '--map_size 65536 bytes is too small' in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_automatic_map_size_grows(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_data, 'MAP_SIZE_MIN', 2 ** 16)
    monkeypatch.setattr(prepare_data, 'MAP_SIZE_HEADROOM', 0.01)
    out = str(tmp_path / 'grown.lmdb')
    assert prepare_data.main(['--out', out, '--size', '64', '--format', 'png', '--n_worker', '0',
                              os.path.join(TEST_IMGS, 'face_imgs')]) == 0
    dataset = MultiResolutionDataset(out, None, 64)
    assert len(dataset) == 8
    np.testing.assert_array_equal(_pixels(dataset[7]), _reference_resized(list_images(
        os.path.join(TEST_IMGS, 'face_imgs'))[7], 64))


def test_unfinished_lmdb_needs_overwrite(tmp_path):
    out = str(tmp_path / 'half.lmdb')
    _write_lmdb(out, [(b'32-00000', _png_bytes(np.zeros((32, 32, 3), np.uint8)))])
    args = ['--out', out, '--size', '32', '--n_worker', '0', os.path.join(TEST_IMGS, 'unaligned')]
    assert prepare_data.main(args) == 2
    with pytest.raises(ValueError, match='length'):
        MultiResolutionDataset(out, None, 32)
    assert prepare_data.main(args + ['--overwrite']) == 0
    assert len(MultiResolutionDataset(out, None, 32)) == 1


def test_a_killed_runs_temporary_lmdb_is_removed_by_the_next_run(tmp_path, capsys):
    """A run killed with SIGKILL leaves '.{name}.tmp-SPACE-PID-XXXXXXXX' (a whole unfinished LMDB): the next
    run removes it, naming it; a temporary of a live process (another run writing now) or of another
    machine stays."""
    out = str(tmp_path / 'faces.lmdb')
    gone = subprocess.Popen([sys.executable, '-c', 'pass'])
    gone.wait()
    space = process_space()  # this machine and PID namespace
    dead = str(tmp_path / f'.faces.lmdb.tmp-{space}-{gone.pid}-0123abcd')
    live = str(tmp_path / f'.faces.lmdb.tmp-{space}-{os.getpid()}-4567cdef')
    other = format(int(space, 16) ^ 1, '08x')
    elsewhere = str(tmp_path / f'.faces.lmdb.tmp-{other}-{gone.pid}-89abcdef')  # a shared folder: not ours
    for folder in (dead, live, elsewhere):
        os.makedirs(folder)
        with open(os.path.join(folder, 'data.mdb'), 'wb') as f:
            f.write(b'half')
    assert prepare_data.main(['--out', out, '--size', '32', '--n_worker', '0',
                              os.path.join(TEST_IMGS, 'unaligned')]) == 0
    assert f'removed {dead}' in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == sorted(['faces.lmdb', os.path.basename(live), os.path.basename(elsewhere)])
    assert len(MultiResolutionDataset(out, None, 32)) == 1


# ---- reading LMDBs written elsewhere ------------------------------------------------------------

def test_reads_stylegan2_pytorch_lmdb(tmp_path):
    """An LMDB laid out as rosinality's prepare_data writes it (JPEG quality 100, 5-digit keys)."""
    out = str(tmp_path / 'rosinality.lmdb')
    arrays = [_reference_resized(p, 32) for p in list_images(os.path.join(TEST_IMGS, 'style_imgs'))[:4]]
    items = [(b'length', b'4')]
    decoded = []
    for i, arr in enumerate(arrays):
        buffer = io.BytesIO()
        Image.fromarray(arr).save(buffer, format='jpeg', quality=100)
        items.append((f'32-{str(i).zfill(5)}'.encode('utf-8'), buffer.getvalue()))
        decoded.append(_pixels(Image.open(io.BytesIO(buffer.getvalue()))))
    _write_lmdb(out, items)
    dataset = MultiResolutionDataset(out, transforms.PILToTensor(), 32)
    assert len(dataset) == 4
    for i, arr in enumerate(arrays):
        got = dataset[i].permute(1, 2, 0).numpy()  # [32, 32, 3] uint8
        np.testing.assert_array_equal(got, decoded[i])
        errors = [np.abs(got.astype(float) - other).mean() for other in arrays]
        assert int(np.argmin(errors)) == i  # lossy (4:2:0 JPEG), but of the right picture


def test_missing_key_is_a_clear_error(tmp_path):
    out = str(tmp_path / 'gap.lmdb')
    png = _png_bytes(np.zeros((8, 8, 3), np.uint8))
    _write_lmdb(out, [(b'length', b'3'), (b'8-00000', png), (b'8-00002', png)])
    dataset = MultiResolutionDataset(out, None, 8)
    assert dataset[2].size == (8, 8)
    with pytest.raises(KeyError, match='8-00001'):
        dataset[1]


# ---- samplers and the style-encoder dataset ------------------------------------------------------

@pytest.fixture(scope='module')
def numbered_lmdbs(tmp_path_factory):
    """Two LMDBs of 4x4 images whose red value is the index and green value marks the LMDB."""
    folder = tmp_path_factory.mktemp('numbered')
    paths = []
    for mark, count in ((10, 6), (200, 9)):
        path = str(folder / f'{mark}.lmdb')
        items = [(b'length', str(count).encode())]
        for i in range(count):
            arr = np.zeros((4, 4, 3), np.uint8)
            arr[:, :, 0] = i
            arr[:, :, 1] = mark
            items.append((f'4-{str(i).zfill(5)}'.encode(), _png_bytes(arr)))
        _write_lmdb(path, items)
        paths.append(path)
    return paths


def test_infinite_sampler_epochs_and_ranks():
    first = iter(InfiniteSampler(10, seed=5))
    epoch0 = [next(first) for _ in range(10)]
    epoch1 = [next(first) for _ in range(10)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10)) and epoch0 != epoch1
    ranks = [iter(InfiniteSampler(10, r, 2, seed=5)) for r in range(2)]
    shards = [[next(s) for _ in range(5)] for s in ranks]
    assert sorted(shards[0] + shards[1]) == list(range(10))
    assert shards[0] == epoch0[0::2] and shards[1] == epoch0[1::2]
    assert [next(iter(InfiniteSampler(10, shuffle=False))) for _ in range(2)] == [0, 0]
    # Resuming with start=k continues the same stream exactly, across epoch boundaries too.
    for rank in range(2):
        full = iter(InfiniteSampler(7, rank, 2, seed=3))
        stream = [next(full) for _ in range(30)]
        for start in (0, 2, 4, 9, 17):
            resumed = iter(InfiniteSampler(7, rank, 2, seed=3, start=start))
            assert [next(resumed) for _ in range(30 - start)] == stream[start:]


def test_paired_loader_independent_shuffles(numbered_lmdbs):
    to_tensor = transforms.PILToTensor()
    natural = MultiResolutionDataset(numbered_lmdbs[0], to_tensor, 4)
    artistic = MultiResolutionDataset(numbered_lmdbs[1], to_tensor, 4)
    loader = PairedLoader(natural, artistic, batch_size=3, seed=7)
    nat_ids, art_ids = [], []
    for _ in range(6):  # 18 samples: 3 epochs of natural, 2 of artistic
        nat, art = next(loader)
        assert nat.shape == art.shape == (3, 3, 4, 4)
        assert (nat[:, 1] == 10).all() and (art[:, 1] == 200).all()
        nat_ids += nat[:, 0, 0, 0].tolist()
        art_ids += art[:, 0, 0, 0].tolist()
    for epoch in range(3):
        assert sorted(nat_ids[6 * epoch:6 * epoch + 6]) == list(range(6))
    for epoch in range(2):
        assert sorted(art_ids[9 * epoch:9 * epoch + 9]) == list(range(9))
    # Independent shuffles: the same LMDB on both sides still comes in two different orders.
    twin_a, twin_b = next(PairedLoader(natural, natural, batch_size=6, seed=3))
    assert sorted(twin_a[:, 0, 0, 0].tolist()) == sorted(twin_b[:, 0, 0, 0].tolist()) == list(range(6))
    assert twin_a[:, 0, 0, 0].tolist() != twin_b[:, 0, 0, 0].tolist()
    again = PairedLoader(natural, artistic, batch_size=3, seed=7)
    assert next(again)[0][:, 0, 0, 0].tolist() == nat_ids[:3]


def test_random_flip_mirrors_exactly_the_drawn_images_left_to_right():
    x = torch.arange(16 * 3 * 4 * 5, dtype=torch.float32).view(16, 3, 4, 5)  # H != W: a vertical flip differs
    u = torch.rand(16, generator=torch.Generator().manual_seed(7))  # the draws random_flip makes from that seed
    chosen = (u < 0.5).tolist()
    assert 0 < sum(chosen) < 16
    assert any(0.25 <= v < 0.5 for v in u.tolist())  # a draw that p / 2 would not flip
    out = random_flip(x, 0.5, torch.Generator().manual_seed(7)).numpy()
    xs = x.numpy()
    for i, flip in enumerate(chosen):
        expected = xs[i, :, :, ::-1] if flip else xs[i]
        np.testing.assert_array_equal(out[i], expected, err_msg=str(i))


@pytest.mark.parametrize('p,low,high', [(0.0, 0.0, 0.0), (0.5, 0.46, 0.54), (0.2, 0.17, 0.23), (1.0, 1.0, 1.0)])
def test_random_flip_rate_is_p(p, low, high):
    n = 4000
    x = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2).repeat(n, 3, 1, 1)  # flipped rows start with 1
    out = random_flip(x, p, torch.Generator().manual_seed(11))
    flipped = out[:, :, 0, 0] == 1  # [n, 3]
    assert (flipped.all(1) == flipped.any(1)).all()  # an image is flipped in every channel or in none
    rate = flipped[:, 0].float().mean().item()
    assert low <= rate <= high, rate


def test_overwrite_never_replaces_a_folder_that_is_not_an_lmdb(tmp_path, capsys):
    """--out photos --overwrite (a slip for another folder) is refused: --overwrite rebuilds LMDBs, it does not
    delete a folder of photos."""
    photos = tmp_path / 'photos'
    photos.mkdir()
    shutil.copy(FACE, photos / 'mine.jpg')
    rc = prepare_data.main(['--out', str(photos), '--overwrite', '--size', '32', '--n_worker', '0',
                            os.path.join(TEST_IMGS, 'unaligned')])
    assert rc == 2
    assert 'is not an LMDB' in capsys.readouterr().err
    assert os.listdir(photos) == ['mine.jpg']


def test_overwrite_replaces_a_finished_lmdb_and_leaves_nothing_beside_it(tmp_path):
    """--overwrite over a finished LMDB: the new images, and the old LMDB gone, not kept as '.old-*' (at 1024 px
    FFHQ's LMDB is ~90 GB)."""
    out = str(tmp_path / 'faces.lmdb')
    assert prepare_data.main(['--out', out, '--size', '32', '--n_worker', '0',
                              os.path.join(TEST_IMGS, 'unaligned')]) == 0
    assert prepare_data.main(['--out', out, '--size', '32', '--n_worker', '0', '--overwrite',
                              os.path.join(TEST_IMGS, 'face_imgs')]) == 0
    assert os.listdir(tmp_path) == ['faces.lmdb']
    assert len(MultiResolutionDataset(out, None, 32)) == len(os.listdir(os.path.join(TEST_IMGS, 'face_imgs')))


def test_a_folder_given_twice_or_inside_another_is_packed_once(tmp_path):
    """FOLDER FOLDER/sub (or one folder twice) packs each image once: duplicates would be drawn twice as often."""
    folder = tmp_path / 'faces'
    (folder / 'sub').mkdir(parents=True)
    names = sorted(os.listdir(os.path.join(TEST_IMGS, 'face_imgs')))[:3]
    shutil.copy(os.path.join(TEST_IMGS, 'face_imgs', names[0]), folder / 'a.jpg')
    for name in names[1:]:
        shutil.copy(os.path.join(TEST_IMGS, 'face_imgs', name), folder / 'sub' / name)
    out = str(tmp_path / 'once.lmdb')
    summary = prepare_data.prepare(prepare_data.parse_args(
        ['--out', out, '--size', '32', '--n_worker', '0', str(folder), str(folder / 'sub'), str(folder)]))
    assert summary.length == 3 and len(MultiResolutionDataset(out, None, 32)) == 3


def test_a_tall_image_keeps_its_vertical_centre(tmp_path):
    """Portrait images (taller than wide): shorter side to the size, the central square, as for wide ones."""
    tall = tmp_path / 'tall'
    tall.mkdir()
    canvas = Image.new('RGB', (512, 768), (0, 0, 255))
    canvas.paste(Image.open(FACE).convert('RGB'), (0, 128))  # face in the middle, blue bands above and below
    canvas.save(tall / 'tall.png')
    out = str(tmp_path / 'tall.lmdb')
    assert prepare_data.main(['--out', out, '--size', '64', '--format', 'png', '--n_worker', '0', str(tall)]) == 0
    got = _pixels(MultiResolutionDataset(out, None, 64)[0]).astype(float)
    expected = _reference_resized(FACE, 64).astype(float)
    assert 10 * np.log10(255 ** 2 / np.mean((got - expected) ** 2)) > 30


def test_a_finished_lmdb_is_kept_for_a_subset_of_its_sizes_and_refused_for_more(tmp_path, capsys):
    """A rerun asking for some of the LMDB's sizes keeps it; asking for one more (with the others) is an error
    naming the missing one, not a silent 'kept'."""
    out = str(tmp_path / 'two.lmdb')
    folder = os.path.join(TEST_IMGS, 'unaligned')
    assert prepare_data.main(['--out', out, '--size', '32,64', '--n_worker', '0', folder]) == 0
    assert prepare_data.main(['--out', out, '--size', '32', '--n_worker', '0', folder]) == 0
    assert 'already a finished LMDB' in capsys.readouterr().out
    assert prepare_data.main(['--out', out, '--size', '32,64,128', '--n_worker', '0', folder]) == 2
    assert 'without [128]' in capsys.readouterr().err


def test_the_resample_option_is_the_filter_used(tmp_path):
    """--resample bilinear stores PIL's bilinear resize, not Lanczos."""
    out = str(tmp_path / 'bilinear.lmdb')
    assert prepare_data.main(['--out', out, '--size', '32', '--format', 'png', '--resample', 'bilinear',
                              '--n_worker', '0', os.path.join(TEST_IMGS, 'unaligned')]) == 0
    source = Image.open(os.path.join(TEST_IMGS, 'unaligned', 'astronaut.png')).convert('RGB')
    bilinear = _pixels(source.resize((32, 32), Image.Resampling.BILINEAR))
    assert not np.array_equal(bilinear, _pixels(source.resize((32, 32), Image.Resampling.LANCZOS)))
    np.testing.assert_array_equal(_pixels(MultiResolutionDataset(out, None, 32)[0]), bilinear)


@pytest.fixture(scope='module')
def small_lmdb(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('small') / 'faces.lmdb')
    assert prepare_data.main(['--out', out, '--size', '8', '--format', 'png', '--n_worker', '0',
                              os.path.join(TEST_IMGS, 'face_imgs')]) == 0
    return out


def test_an_index_outside_the_dataset_is_an_index_error(small_lmdb):
    """Negative indices too: Python's negative indexing would silently read the last images instead."""
    dataset = MultiResolutionDataset(small_lmdb, None, 8)
    for index in (-1, len(dataset)):
        with pytest.raises(IndexError):
            dataset[index]


def test_a_dataset_that_has_read_pickles_without_its_lmdb_handle(small_lmdb):
    """DataLoader workers started by spawn (macOS, Windows, forkserver) receive the dataset pickled: its LMDB
    handle is left out and reopened there."""
    dataset = MultiResolutionDataset(small_lmdb, None, 8)
    first = _pixels(dataset[0])
    copy = pickle.loads(pickle.dumps(dataset))
    np.testing.assert_array_equal(_pixels(copy[0]), first)


def _child_reads(dataset, queue):
    dataset[1]
    queue.put(dataset._env_pid == os.getpid())


def test_a_forked_worker_opens_its_own_lmdb_handle(small_lmdb):
    """A dataset read in the parent and then forked (DataLoader workers on Linux): the child opens its own handle;
    LMDB forbids using one inherited through fork."""
    dataset = MultiResolutionDataset(small_lmdb, None, 8)
    dataset[0]  # the parent's handle
    ctx = multiprocessing.get_context('fork')
    queue = ctx.Queue()
    child = ctx.Process(target=_child_reads, args=(dataset, queue))
    child.start()
    own = queue.get(timeout=60)
    child.join(60)
    assert child.exitcode == 0 and own


_encode_file = prepare_data._encode_file


def _encode_file_in_a_default_sigterm_worker(task):  # the pool pickles it by name; it runs in a forked worker
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, 'a worker keeps a Python SIGTERM handler'
    return _encode_file(task)


def test_pool_workers_end_at_once_on_sigterm(tmp_path, monkeypatch):
    """The encoding workers are forked inside main's exit_on_sigterm; they take SIGTERM's default action again, so
    the pool's terminate() ends them at once (a Python handler's exit path can block on a lock the fork copied)."""
    monkeypatch.setattr(prepare_data, '_encode_file', _encode_file_in_a_default_sigterm_worker)
    out = str(tmp_path / 'faces.lmdb')
    assert prepare_data.main(['--out', out, '--size', '8', '--n_worker', '2',
                              os.path.join(TEST_IMGS, 'face_imgs')]) == 0
    assert len(MultiResolutionDataset(out, None, 8)) == len(os.listdir(os.path.join(TEST_IMGS, 'face_imgs')))
