"""align_faces.py on real photos: FFHQ layout, stability on aligned faces, rotation, the CLI's report."""

import glob
import os
import re
import shutil
import signal
import time

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

import align_faces
from conftest import fill_disk
from fileio import DiskFullError, atomic_path
from align_faces import align_face, align_from_landmarks, detect_landmarks, ffhq_quad, load_face_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FACES = sorted(glob.glob(os.path.join(ROOT, 'test_imgs', 'face_imgs', '*.jpg')))
ASTRONAUT = os.path.join(ROOT, 'test_imgs', 'unaligned', 'astronaut.png')


def _rgb(path):
    return np.asarray(Image.open(path).convert('RGB'))


def _psnr(a, b):
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return 10 * np.log10(255 ** 2 / mse)


@pytest.fixture(scope='module')
def models():
    return load_face_models()


def _main_face_landmarks(img, models):
    detector, predictor = models
    found = detect_landmarks(np.asarray(img), detector, predictor)
    assert found, 'no face found'
    return max(found, key=lambda lm: ffhq_quad(lm)[1])  # [68, 2]


def _eyes(img, models, lm=None):
    """Eye centres (left x, left y, right x, right y) as fractions of the image width."""
    lm = _main_face_landmarks(img, models) if lm is None else lm
    width = np.asarray(img).shape[1]
    return np.concatenate([lm[36:42].mean(axis=0), lm[42:48].mean(axis=0)]) / width


def _eye_line_degrees(img, models):
    eyes = _eyes(img, models)
    return np.degrees(np.arctan2(eyes[3] - eyes[1], eyes[2] - eyes[0]))


@pytest.fixture(scope='module')
def ffhq_landmarks(models):
    """Landmarks of the FFHQ test faces (512 px, aligned by NVIDIA's FFHQ script)."""
    return {path: _main_face_landmarks(_rgb(path), models) for path in FACES}


@pytest.fixture(scope='module')
def ffhq_template(models, ffhq_landmarks):
    """Where FFHQ puts the eyes: mean eye centres of the FFHQ test faces."""
    return np.mean([_eyes(_rgb(path), models, lm) for path, lm in ffhq_landmarks.items()], axis=0)


def test_template_is_ffhq_geometry(ffhq_template, ffhq_landmarks):
    # Sanity of the reference itself: eyes level, a quarter of the width apart, just above the middle.
    assert abs(ffhq_template[0] - 0.375) < 0.01 and abs(ffhq_template[2] - 0.625) < 0.01
    assert abs(ffhq_template[1] - ffhq_template[3]) < 0.01 and 0.45 < ffhq_template[1] < 0.5
    # The crop square our code derives from an FFHQ face's own landmarks is that face's frame.
    for path, lm in ffhq_landmarks.items():
        size = Image.open(path).size[0]
        quad, qsize = ffhq_quad(lm)
        corners = np.array([[0, 0], [0, size], [size, size], [size, 0]], np.float64)
        assert np.abs(quad + 0.5 - corners).max() < 0.02 * size, path
        assert abs(qsize / size - 1) < 0.03, path


def test_astronaut_eyes_land_on_ffhq_template(models, ffhq_template):
    detector, predictor = models
    faces = align_face(_rgb(ASTRONAUT), predictor, detector, output_size=256)
    assert len(faces) == 1
    face = faces[0]
    assert face.mode == 'RGB' and face.size == (256, 256)
    assert np.abs(_eyes(face, models) - ffhq_template).max() < 0.02
    # The default is the largest face: the woman, not the face-like mission patch.
    every = align_face(_rgb(ASTRONAUT), predictor, detector, output_size=256, all_faces=True)
    assert len(every) == 2
    np.testing.assert_array_equal(np.asarray(every[0]), np.asarray(face))


def test_aligned_ffhq_face_comes_back_nearly_unchanged(models):
    detector, predictor = models
    img = Image.open(os.path.join(ROOT, 'test_imgs', 'face_imgs', '000026.jpg')).convert('RGB')
    face = align_face(np.asarray(img), predictor, detector, output_size=256)[0]
    reference = img.resize((256, 256), Image.Resampling.LANCZOS)
    assert _psnr(face, reference) > 25


@pytest.mark.parametrize('angle,scale', [(20, 0.55), (-20, 0.9)])
def test_rotated_scaled_face_comes_back_upright(models, ffhq_template, angle, scale):
    detector, predictor = models
    face = Image.open(os.path.join(ROOT, 'test_imgs', 'face_imgs', '000027.jpg')).convert('RGB')
    face = face.resize((round(512 * scale),) * 2, Image.Resampling.LANCZOS)
    photo = Image.new('RGB', (640, 640), (128, 128, 128))
    photo.paste(face, ((640 - face.size[0]) // 2, (640 - face.size[1]) // 2))
    photo = photo.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=(128, 128, 128))
    assert abs(abs(_eye_line_degrees(photo, models)) - 20) < 3  # the input really is tilted

    aligned = align_face(np.asarray(photo), predictor, detector, output_size=256)[0]
    assert abs(_eye_line_degrees(aligned, models)) < 2
    assert np.abs(_eyes(aligned, models) - ffhq_template).max() < 0.02


def test_transform_is_exact_under_known_motions(models):
    """Moving the photo and its landmarks together must not move the output (pixel-centre conventions)."""
    img = _rgb(os.path.join(ROOT, 'test_imgs', 'face_imgs', '000026.jpg'))  # [512, 512, 3]
    lm = _main_face_landmarks(img, models)
    # 512 px output so that FFHQ's pre-shrink stays off; 2x (not 4x) supersampling to save time.
    base = align_from_landmarks(img, lm, 512, transform_size=1024)

    # 90 degree turn: pixel (x, y) moves to (y, W - 1 - x).
    turned = np.ascontiguousarray(np.rot90(img))
    lm_turned = np.stack([lm[:, 1], img.shape[1] - 1 - lm[:, 0]], axis=1)
    assert _psnr(align_from_landmarks(turned, lm_turned, 512, transform_size=1024), base) > 50

    # Nearest-neighbour 2x enlargement: pixel centre x moves to 2x + 0.5 (2x alone gives ~40 dB).
    doubled = np.repeat(np.repeat(img, 2, axis=0), 2, axis=1)
    assert _psnr(align_from_landmarks(doubled, 2 * lm + 0.5, 512, transform_size=1024), base) > 45


def test_wide_seam_blur_matches_direct_filter():
    """The reduced-resolution blur used for large faces equals scipy's full-resolution Gaussian."""
    arr = np.asarray(Image.open(ASTRONAUT).convert('RGB').resize((301, 337)), dtype=np.float32).copy()
    for sigma in (5.0, 17.0, 33.3):
        expected = gaussian_filter(arr, [sigma, sigma, 0])
        got = align_faces._gaussian_blur(arr, sigma)
        assert got.shape == expected.shape and got.dtype == np.float32
        assert np.abs(got - expected).max() < 0.1, sigma


def test_padding_touches_only_the_margin(models):
    """A close-up whose crop leaves the photo: inside the photo (beyond FFHQ's blur band of 0.1 qsize
    from its edge) the output equals the unpadded rendering; outside, the fill is smooth, not black."""
    photo = Image.open(ASTRONAUT).convert('RGB').crop((150, 40, 330, 240))
    photo = np.asarray(photo.resize((900, 1000), Image.Resampling.BICUBIC))  # [1000, 900, 3]
    lm = _main_face_landmarks(photo, models)
    quad, qsize = ffhq_quad(lm)
    assert qsize * 0.02 > 2 * align_faces.BLUR_FULL_RES_MAX_SIGMA  # the reduced-resolution blur runs
    size = 128
    padded = np.asarray(align_from_landmarks(photo, lm, size), np.float64)
    bare = np.asarray(align_from_landmarks(photo, lm, size, enable_padding=False), np.float64)

    # Source position of each output pixel centre (the crop square maps affinely).
    v, u = (np.mgrid[:size, :size] + 0.5) / size
    src = quad[0] + u[..., None] * (quad[3] - quad[0]) + v[..., None] * (quad[1] - quad[0])  # [S, S, 2]
    height, width = photo.shape[:2]
    resampling_reach = 4 * qsize / size  # Lanczos support of the final downsampling, in photo pixels
    depth = np.minimum(np.minimum(src[..., 0], width - src[..., 0]),
                       np.minimum(src[..., 1], height - src[..., 1]))  # [S, S], negative outside
    inside = depth > 0.1 * qsize + resampling_reach
    outside = depth < -resampling_reach
    assert inside.mean() > 0.5 and outside.mean() > 0.05
    np.testing.assert_array_equal(padded[inside], bare[inside])
    assert padded[outside].mean() > 60  # filled, unlike the black of the unpadded rendering
    roughness = np.abs(np.diff(padded, axis=1)).mean(axis=2)  # [S, S - 1]
    assert roughness[outside[:, :-1]].mean() < 0.5 * roughness[inside[:, :-1]].mean()


def test_a_photo_larger_than_the_detection_side_gets_the_landmarks_of_its_face(models):
    """Faces are detected on a copy of at most DETECT_MAX_SIDE px and the rectangle scaled back: a 3x photo
    (1536 px, as most camera photos exceed 1024 px) has the landmarks of the 512 px photo, times 3."""
    detector, predictor = models
    small = _rgb(ASTRONAUT)  # [512, 512, 3]
    big = np.asarray(Image.fromarray(small).resize((1536, 1536), Image.Resampling.LANCZOS))
    assert max(big.shape) > align_faces.DETECT_MAX_SIDE
    lm_small = _main_face_landmarks(small, models)
    found = detect_landmarks(big, detector, predictor)
    assert found
    lm_big = max(found, key=lambda lm: ffhq_quad(lm)[1])
    face = ffhq_quad(lm_small)[1]
    # pixel centre x of the small photo is pixel 3x + 1 of the big one
    assert np.abs((lm_big - 1) / 3 - lm_small).mean() < 0.01 * face
    a = np.asarray(align_face(big, predictor, detector, output_size=64)[0], np.float64)
    b = np.asarray(align_face(small, predictor, detector, output_size=64)[0], np.float64)
    assert 10 * np.log10(255 ** 2 / np.mean((a - b) ** 2)) > 25


def _ffhq_alignment_reference(photo, quad, qsize, output_size, transform_size):
    """FFHQ's alignment from the crop square on, step by step with the FFHQ dataset's parameters, in plain
    numpy / scipy / PIL: an oracle independent of align_faces' cv2 padding and its downsampled blur."""
    def box(q):  # [left, top, right, bottom]: the integer bounding box of the quad's corners
        return np.concatenate([np.floor(q.min(0)), np.ceil(q.max(0))]).astype(int)

    img, quad = photo, quad.astype(np.float64)
    # 1. a face over 4x the output side is first downscaled by an integer factor (Lanczos)
    factor = int(qsize / output_size / 2)
    if factor >= 2:
        img = img.resize(tuple(int(np.rint(side / factor)) for side in img.size), Image.Resampling.LANCZOS)
        quad, qsize = quad / factor, qsize / factor
    margin = max(int(np.rint(qsize / 10)), 3)
    # 2. crop to the quad's box widened by the margin, where that box is smaller than the photo
    width, height = img.size
    left, top, right, bottom = box(quad)
    crop = (max(left - margin, 0), max(top - margin, 0), min(right + margin, width), min(bottom + margin, height))
    if (crop[2] - crop[0], crop[3] - crop[1]) != (width, height):
        img, quad = img.crop(crop), quad - crop[:2]
    # 3. where the widened box leaves the photo by more than margin - 4: reflect-pad every side by at least
    #    0.3 qsize, blur towards the outer edge, then fade into the median colour
    width, height = img.size
    left, top, right, bottom = box(quad)
    need = np.clip([margin - left, margin - top, right + margin - width, bottom + margin - height], 0, None)
    if need.max() > margin - 4:
        p = np.maximum(need, int(np.rint(qsize * 0.3)))  # left, top, right, bottom
        arr = np.pad(np.asarray(img, np.float32), ((p[1], p[3]), (p[0], p[2]), (0, 0)), mode="reflect")
        yy, xx = np.mgrid[:arr.shape[0], :arr.shape[1]].astype(np.float32)
        # 1 on the outer edge, 0 where the photo begins, negative inside it
        edge = np.stack([1 - xx / p[0], 1 - (arr.shape[1] - 1 - xx) / p[2],
                         1 - yy / p[1], 1 - (arr.shape[0] - 1 - yy) / p[3]]).max(0)[..., None]
        sigma = qsize * 0.02
        arr = arr + (gaussian_filter(arr, [sigma, sigma, 0]) - arr) * np.clip(3 * edge + 1, 0, 1)
        arr = arr + (np.median(arr, axis=(0, 1)) - arr) * np.clip(edge, 0, 1)
        img, quad = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8)), quad + p[:2]
    # 4. sample the quad (its corners at pixel centres) bilinearly, then Lanczos down to the output size
    img = img.transform((transform_size, transform_size), Image.Transform.QUAD, (quad + 0.5).flatten(),
                        Image.Resampling.BILINEAR)
    return img.resize((output_size, output_size), Image.Resampling.LANCZOS) if output_size < transform_size else img


@pytest.mark.parametrize('case', ['close_up', 'off_centre', 'just_past_the_edge', 'far_past_the_top'])
def test_alignment_is_ffhqs_from_the_crop_square_on(models, case):
    """From the crop square on (shrink, crop, pad, blur, fill, transform, downsampling) the output is that of
    FFHQ's published script: a pre-shrink by 2 and a pad on all sides (close-up), a crop on one axis (face near a
    corner), a square 2 px short of the photo's edge (padded: FFHQ pads from border - 4), one leaving the top by
    0.4 of its side (unequal pads). The last two move the landmarks, not the photo."""
    photo = Image.open(ASTRONAUT).convert('RGB')
    if case == 'close_up':
        photo = photo.crop((150, 40, 330, 240)).resize((900, 1000), Image.Resampling.BICUBIC)
    elif case == 'off_centre':
        photo = photo.crop((150, 40, 512, 512)).resize((724, 944), Image.Resampling.BICUBIC)
    arr = np.asarray(photo)
    lm = _main_face_landmarks(arr, models)
    quad, qsize = ffhq_quad(lm)
    if case == 'just_past_the_edge':  # the square's left corner 2.3 px right of the photo's edge
        lm = lm + [2.3 - quad[:, 0].min(), 0]
    elif case == 'far_past_the_top':
        lm = lm + [0, -0.4 * qsize - quad[:, 1].min()]
    quad, qsize = ffhq_quad(lm)
    output_size = int(qsize // 5) if case == 'close_up' else 128 if case == 'off_centre' else 64
    if case == 'close_up':
        assert int(np.floor(qsize / output_size * 0.5)) == 2  # the pre-shrink runs, by 2
    assert qsize / max(int(np.floor(qsize / output_size * 0.5)), 1) * 0.02 < 2 * align_faces.BLUR_FULL_RES_MAX_SIGMA
    transform_size = 2 * output_size  # 2x supersampling to save time; the pipeline is the same
    got = np.asarray(align_from_landmarks(arr, lm, output_size, transform_size=transform_size), np.int16)
    expected = np.asarray(_ffhq_alignment_reference(photo, quad, qsize, output_size, transform_size), np.int16)
    # float32 rounding of the blend may move a pixel by one grey level
    assert np.abs(got - expected).max() <= 1 and (got != expected).mean() < 0.01


def test_cli_reports_skipped_and_writes_pngs(tmp_path, capsys, models):
    photos = tmp_path / 'photos'
    (photos / 'sub').mkdir(parents=True)
    shutil.copy(ASTRONAUT, photos / 'astronaut.png')
    Image.fromarray(_rgb(ASTRONAUT)[0:280, 330:512]).save(photos / 'sub' / 'shuttle.jpg')  # no face
    (photos / 'broken.jpg').write_bytes(b'\xff\xd8 not a jpeg')
    exif = Image.Exif()
    exif[0x0112] = 8  # stored turned, displayed upright after a 90 degree counter-clockwise turn
    upright = Image.open(FACES[0]).convert('RGB')
    upright.transpose(Image.Transpose.ROTATE_270).save(photos / 'sub' / 'turned.webp', exif=exif, quality=95)

    outdir = tmp_path / 'aligned'
    argv = ['--input_img_path', str(photos), '--outdir', str(outdir), '--output_size', '64', '--n_worker', '2']
    assert align_faces.main(argv) == 0
    printed = capsys.readouterr().out
    written = sorted(os.path.relpath(os.path.join(d, f), outdir) for d, _, fs in os.walk(outdir) for f in fs)
    assert written == ['astronaut.png', os.path.join('sub', 'turned.png')]
    assert 'aligned 2 of 4 images' in printed
    assert f"no face found): {photos / 'sub' / 'shuttle.jpg'}" in printed
    assert 'unreadable' in printed and 'broken.jpg' in printed
    for name in written:
        with Image.open(outdir / name) as out:
            assert out.format == 'PNG' and out.size == (64, 64) and out.mode == 'RGB'
    # The EXIF-turned photo was aligned upright: same result as the upright original.
    detector, predictor = models
    expected = align_face(np.asarray(upright), predictor, detector, output_size=64)[0]
    assert _psnr(Image.open(outdir / 'sub' / 'turned.png'), expected) > 25

    argv = ['--input_img_path', str(photos / 'astronaut.png'), '--outdir', str(tmp_path / 'all'),
            '--output_size', '64', '--all_faces', '--n_worker', '0']
    assert align_faces.main(argv) == 0
    assert sorted(os.listdir(tmp_path / 'all')) == ['astronaut_0.png', 'astronaut_1.png']

    argv = ['--input_img_path', str(photos / 'sub' / 'shuttle.jpg'), '--outdir', str(tmp_path / 'none'),
            '--output_size', '64', '--n_worker', '0']
    assert align_faces.main(argv) == 1
    assert 'shuttle.jpg' in capsys.readouterr().out


def test_a_single_photo_in_the_current_folder_is_not_overwritten(tmp_path, capsys, monkeypatch):
    """--input_img_path face.png --outdir . would write ./face.png over the photo: refused when parsing, as
    for a folder (the folder of a bare file name is '.')."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(ASTRONAUT, tmp_path / 'face.png')
    with pytest.raises(SystemExit):
        align_faces.parse_args(['--input_img_path', 'face.png', '--outdir', '.'])
    assert '--outdir . is the --input_img_path folder .' in capsys.readouterr().err
    assert align_faces.parse_args(['--input_img_path', 'face.png', '--outdir', 'aligned']).outdir == 'aligned'


def test_outdir_inside_the_photos_folder_takes_no_earlier_output(tmp_path, capsys, models):
    """photos/ -> photos/aligned/: the PNGs of an earlier run (here one with a face) are not aligned again
    into photos/aligned/aligned/."""
    photos = tmp_path / 'photos'
    (photos / 'aligned').mkdir(parents=True)
    shutil.copy(ASTRONAUT, photos / 'astronaut.png')
    shutil.copy(ASTRONAUT, photos / 'aligned' / 'earlier.png')
    argv = ['--input_img_path', str(photos), '--outdir', str(photos / 'aligned'), '--output_size', '32',
            '--n_worker', '0']
    assert align_faces.main(argv) == 0
    printed = capsys.readouterr()
    written = sorted(os.path.relpath(os.path.join(d, f), photos) for d, _, fs in os.walk(photos) for f in fs)
    assert written == [os.path.join('aligned', 'astronaut.png'), os.path.join('aligned', 'earlier.png'),
                       'astronaut.png']
    assert 'aligned 1 of 1 images' in printed.out
    assert f"note: 1 image(s) in --outdir {photos / 'aligned'} left out: outputs, not inputs" in printed.err


def test_two_photos_with_one_output_name_the_second_is_named_and_skipped(tmp_path, capsys, models):
    """a.jpg beside a.png would both be written as a.png: the second is named, the rest aligned."""
    photos = tmp_path / 'photos'
    photos.mkdir()
    shutil.copy(ASTRONAUT, photos / 'astronaut.png')
    Image.open(ASTRONAUT).convert('RGB').save(photos / 'astronaut.jpg', quality=95)
    Image.open(FACES[0]).save(photos / 'face.png')
    outdir = tmp_path / 'aligned'
    argv = ['--input_img_path', str(photos), '--outdir', str(outdir), '--output_size', '32', '--n_worker', '0']
    assert align_faces.main(argv) == 0
    printed = capsys.readouterr().out
    assert sorted(os.listdir(outdir)) == ['astronaut.png', 'face.png']
    assert 'aligned 2 of 3 images' in printed
    assert f"skipped (same output name as {photos / 'astronaut.jpg'}, rename one): {photos / 'astronaut.png'}" in printed
    detector, predictor = models  # the one written is the first file's (the JPEG)
    expected = align_face(_rgb(photos / 'astronaut.jpg'), predictor, detector, output_size=32)[0]
    np.testing.assert_array_equal(_rgb(outdir / 'astronaut.png'), np.asarray(expected))


@pytest.mark.parametrize('n_worker', [0, 2])
def test_a_full_disk_stops_the_run_with_one_line_and_whole_pngs(tmp_path, small_disk, n_worker):
    """The next faces would not fit either: the run stops at the first full-disk error; the PNGs written are whole
    and no temporary is left, also of a worker process stopped while it was writing one."""
    photos = tmp_path / 'photos'
    photos.mkdir()
    for path in FACES[:4]:
        shutil.copy(path, photos)
    fill_disk(small_disk, 96 * 1024)  # room for a PNG or two of 128 px
    outdir = small_disk / 'aligned'
    with pytest.raises(SystemExit) as stop:
        align_faces.main(['--input_img_path', str(photos), '--outdir', str(outdir), '--output_size', '128',
                          '--n_worker', str(n_worker)])
    written = sorted(os.listdir(outdir))
    assert 0 < len(written) < 4 and all(name.endswith('.png') and not name.startswith('.') for name in written)
    assert re.fullmatch(rf'error: cannot write {re.escape(str(outdir))}/\d+\.png: the disk is full \(0 MiB free in '
                        rf'{re.escape(str(outdir))}\); no part of it was left there; the PNGs already in '
                        rf'{re.escape(str(outdir))} are complete', stop.value.code), stop.value.code
    for name in written:
        with Image.open(outdir / name) as out:
            out.load()
            assert out.format == 'PNG' and out.size == (128, 128)


_align_one = align_faces._align_one


def _align_one_in_a_default_sigterm_worker(task):  # the pool pickles it by name; it runs in a forked worker
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, 'an idle worker keeps a Python SIGTERM handler'
    return _align_one(task)


def test_idle_workers_end_at_once_on_sigterm_and_a_writing_one_cleans_up(tmp_path, monkeypatch):
    """The workers are forked inside main's exit_on_sigterm: outside their writes SIGTERM has its default action
    again, so the pool's terminate() ends an idle worker at once (a Python handler's exit path can block on a lock
    the fork copied held); while writing, SIGTERM raises SystemExit so that the temporary PNG is removed."""
    def save(face, name, image_format):
        assert callable(signal.getsignal(signal.SIGTERM)), 'a writing worker has no SIGTERM cleanup'
        face.save(name, image_format)

    monkeypatch.setattr(align_faces, '_align_one', _align_one_in_a_default_sigterm_worker)
    monkeypatch.setattr(align_faces, 'save_image_atomic', save)
    photos = tmp_path / 'photos'
    photos.mkdir()
    for path in FACES[:2]:
        shutil.copy(path, photos)
    argv = ['--input_img_path', str(photos), '--outdir', str(tmp_path / 'aligned'), '--output_size', '32',
            '--n_worker', '2']
    assert align_faces.main(argv) == 0
    assert len(os.listdir(tmp_path / 'aligned')) == 2


def test_a_worker_stopped_while_writing_leaves_no_temporary(tmp_path, monkeypatch):
    """A full disk in one worker stops the pool while another is still writing its PNG: the workers inherit main's
    SIGTERM handler (exit_on_sigterm), so the one the pool's terminate() stops removes its temporary."""
    photos = tmp_path / 'photos'
    photos.mkdir()
    for path in FACES[:2]:
        shutil.copy(path, photos)
    first = os.path.splitext(os.path.basename(FACES[0]))[0]

    def save(face, name, image_format):  # in the forked workers
        if os.path.basename(name) == f'{first}.png':
            time.sleep(1)  # the other worker is in the middle of its write by then
            raise DiskFullError(f'cannot write {name}: the disk is full (0 MiB free in {os.path.dirname(name)}); '
                                'no part of it was left there')
        with atomic_path(name) as tmp:
            with open(tmp, 'wb') as f:
                f.write(b'half a PNG')
                f.flush()
                time.sleep(60)

    monkeypatch.setattr(align_faces, 'save_image_atomic', save)
    outdir = tmp_path / 'aligned'
    with pytest.raises(SystemExit, match='the disk is full'):
        align_faces.main(['--input_img_path', str(photos), '--outdir', str(outdir), '--output_size', '64',
                          '--n_worker', '2'])
    assert os.listdir(outdir) == []
