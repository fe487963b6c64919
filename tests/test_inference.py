"""The three inference scripts end to end on CPU with size-64 release-layout checkpoints built here."""
import itertools
import math
import os
import shutil
import subprocess
import sys
import types

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import gen_video
import generate_image_pairs
import style_transfer_folder
from checkpoint import CheckpointError
from conftest import fill_disk, synthesis_only
from inference import encode_faces, encode_styles, load_blendgan, load_psp, pooled_batches, resize, stem
from model import Generator, infer_generator_config
from psp_encoder.psp_encoders import PSPEncoder
from utils import img2ten, ten2img
from video import interpolation_alphas, read_mp4, sliding_window, write_mp4

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FACES = os.path.join(ROOT, "test_imgs", "face_imgs")
STYLES = os.path.join(ROOT, "test_imgs", "style_imgs")
SIZE = 64


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Release-layout blendgan.pt (size 64, style_dim 512: pSp codes are 512-D) and psp_encoder.pt."""
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    g = Generator(SIZE, 512, 2, channel_multiplier=1, load_pretrained_vgg=False)
    with torch.no_grad():  # trained-like WBM weights and noise strengths
        g.add_weight.copy_(torch.linspace(0.9, 0.1, g.n_latent).view(1, -1, 1))
        for layer in [g.conv1, *g.convs]:
            layer.noise.weight.fill_(0.05)
    latent_avg = g.mean_latent(256).detach()
    torch.save({"g_ema": g.state_dict(), "latent_avg": latent_avg}, d / "blendgan.pt")
    psp = PSPEncoder(None, output_size=SIZE)
    with torch.no_grad():
        for m in psp.modules():  # BatchNorm running stats of an untrained net are (0, 1); make them realistic
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.fill_(4.0)
    sd = {f"encoder.{k}": v for k, v in psp.encoder.state_dict().items()}
    torch.save({**sd, "latent_avg": latent_avg[0]}, d / "psp_encoder.pt")
    yield str(d / "blendgan.pt"), str(d / "psp_encoder.pt")
    shutil.rmtree(d, ignore_errors=True)  # its module is done: do not keep 1.9 GB to the session's end


def read_rgb(path):
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    assert img is not None, f"{path} does not decode"
    return img[:, :, ::-1]


def jpeg_roundtrip(rgb):
    """What our writer would store for this image, decoded (the writer is cv2.imencode, quality 95)."""
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]))
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1].astype(float)


def run_main(module, args):
    return module.main([str(a) for a in args])


def test_generate_pairs_latent_guided_matches_in_process_generation(ckpts, tmp_path):
    ckpt, _ = ckpts
    out = tmp_path / "pairs"
    code = run_main(generate_image_pairs, ["--ckpt", ckpt, "--pics", 3, "--outdir", out, "--seed", 7, "--batch", 2,
                                           "--device", "cpu"])
    assert code == 0
    files = sorted(os.listdir(out))
    assert files == ["000000.jpg", "000001.jpg", "000002.jpg"]
    # independent: the same draws (style code first, then one face code per picture) through the generator
    g, c = load_blendgan(ckpt)
    rng = torch.Generator().manual_seed(7)
    z_embed = torch.randn(1, 512, generator=rng)
    zs = [torch.randn(1, 512, generator=rng) for _ in range(3)]
    kw = dict(truncation=0.75, truncation_latent=c["latent_avg"], randomize_noise=False)
    with torch.no_grad():
        for i, z in enumerate(zs):
            nat = ten2img(g([z], **kw)[0])[0]
            sty = ten2img(g([z], z_embed=z_embed, add_weight_index=6, **kw)[0])[0]
            got = read_rgb(str(out / f"{i:06d}.jpg"))
            assert got.shape == (SIZE, 2 * SIZE, 3)
            expected = jpeg_roundtrip(np.concatenate([nat, sty], axis=1))
            assert np.abs(got - expected).mean() < 0.5
            assert np.abs(nat.astype(float) - sty).mean() > 3.0  # the style branch really acts
    # same seed and batch -> same files (another batch size rounds differently: one sample modulates the
    # weights, a batch the activations); another seed -> other faces
    again = tmp_path / "again"
    run_main(generate_image_pairs, ["--ckpt", ckpt, "--pics", 3, "--outdir", again, "--seed", 7, "--batch", 2,
                                    "--device", "cpu"])
    assert all((out / f).read_bytes() == (again / f).read_bytes() for f in files)
    other = tmp_path / "other"
    run_main(generate_image_pairs, ["--ckpt", ckpt, "--pics", 1, "--outdir", other, "--seed", 8, "--device", "cpu"])
    assert np.abs(read_rgb(str(other / files[0])).astype(float) - read_rgb(str(out / files[0]))).mean() > 5


def test_generate_pairs_reference_guided_and_natural_indicator(ckpts, tmp_path, capsys):
    ckpt, _ = ckpts
    styles = sorted(os.listdir(STYLES))
    outs = []
    for style in styles[:2]:
        out = tmp_path / style
        assert run_main(generate_image_pairs, ["--ckpt", ckpt, "--pics", 2, "--outdir", out, "--device", "cpu",
                                               "--style_img", os.path.join(STYLES, style)]) == 0
        outs.append([read_rgb(str(out / f)).astype(float) for f in sorted(os.listdir(out))])
    rerun = tmp_path / "rerun"
    run_main(generate_image_pairs, ["--ckpt", ckpt, "--pics", 2, "--outdir", rerun, "--device", "cpu",
                                    "--style_img", os.path.join(STYLES, styles[0])])
    for f in os.listdir(rerun):  # reference-guided output does not change from run to run
        assert (rerun / f).read_bytes() == (tmp_path / styles[0] / f).read_bytes()
    for a, b in zip(*outs):
        assert np.abs(a[:, :SIZE] - b[:, :SIZE]).mean() < 0.5  # same natural faces
        assert np.abs(a[:, SIZE:] - b[:, SIZE:]).mean() > 1.0  # the style image changes the result
    # indicator i = n_latent (10 at 64 px) is exactly the natural face
    out = tmp_path / "natural"
    run_main(generate_image_pairs, ["--ckpt", ckpt, "--pics", 1, "--outdir", out, "--device", "cpu",
                                    "--style_img", os.path.join(STYLES, styles[0]), "--add_weight_index", 10])
    img = read_rgb(str(out / "000000.jpg"))
    # identical halves give identical JPEG blocks; only the decoder's chroma upsampling at the seam differs
    assert np.array_equal(img[:, 1:SIZE - 1], img[:, SIZE + 1:-1])
    # beyond this generator's 10 layers, as the release: 18 (1024 px's natural face) is the natural face,
    # -11 full style as 0; each noted once, with or without --size
    capsys.readouterr()
    for index, same_as, size_args, meaning in ((18, 10, [], "the natural face, as 10"),
                                               (-11, 0, ["--size", SIZE], "full style, as 0")):
        outs = []
        for i in (index, same_as):
            run_main(generate_image_pairs, ["--ckpt", ckpt, "--pics", 1, "--outdir", tmp_path / f"i{i}", "--device",
                                            "cpu", "--style_img", os.path.join(STYLES, styles[0]),
                                            "--add_weight_index", i] + size_args)
            outs.append((tmp_path / f"i{i}" / "000000.jpg").read_bytes())
        assert outs[0] == outs[1], index
        err = capsys.readouterr().err
        assert err.count(f"--add_weight_index {index} is outside [-10, 10] for this 64 px generator (10 layers); "
                         f"{'every' if index > 0 else 'no'} layer keeps the face code: {meaning}") == 1, err


def test_style_transfer_folder_outputs_and_values(ckpts, tmp_path):
    ckpt, psp_ckpt = ckpts
    faces, styles = tmp_path / "faces", tmp_path / "styles"
    faces.mkdir(), styles.mkdir()
    for name in sorted(os.listdir(FACES))[:2]:
        shutil.copy(os.path.join(FACES, name), faces)
    for name in sorted(os.listdir(STYLES))[:3]:
        shutil.copy(os.path.join(STYLES, name), styles)
    out = tmp_path / "out"
    args = ["--ckpt", ckpt, "--psp_encoder_ckpt", psp_ckpt, "--input_img_path", faces, "--style_img_path", styles,
            "--outdir", out, "--device", "cpu", "--batch", 4]
    assert run_main(style_transfer_folder, args) == 0
    names = sorted(os.listdir(out))
    expected_names = sorted(f"{os.path.splitext(f)[0]}_v_{os.path.splitext(s)[0]}.jpg"
                            for f in os.listdir(faces) for s in os.listdir(styles))
    assert names == expected_names
    # independent per-pair computation, as the release: encoders on the full-resolution image
    g, _ = load_blendgan(ckpt)
    psp = load_psp(psp_ckpt, SIZE)
    face_name, style_name = sorted(os.listdir(faces))[1], sorted(os.listdir(styles))[2]
    face, style = read_rgb(str(faces / face_name)), read_rgb(str(styles / style_name))
    with torch.no_grad():
        codes = psp(img2ten(face))
        z = g.get_z_embed(img2ten(style))
        result = ten2img(g([codes], z_embed=z, add_weight_index=6, input_is_latent=True, randomize_noise=False)[0])[0]
    got = read_rgb(str(out / f"{os.path.splitext(face_name)[0]}_v_{os.path.splitext(style_name)[0]}.jpg"))
    assert got.shape == (SIZE, 3 * SIZE, 3)
    expected = jpeg_roundtrip(np.concatenate([resize(face, SIZE), resize(style, SIZE), result], axis=1))
    assert np.abs(got - expected).mean() < 0.5
    # batched encoders give the codes of one-by-one encoding
    with torch.no_grad():
        both = encode_faces(psp, [face, read_rgb(str(faces / sorted(os.listdir(faces))[0]))], 2, "cpu", torch.float32)
        assert torch.allclose(both[0], codes[0], atol=1e-4)
        zs = encode_styles(g, [style], 1, "cpu", torch.float32)
        assert torch.allclose(zs, z, rtol=1e-4, atol=1e-5)
    # --skip_existing resumes without rewriting
    before = {n: os.path.getmtime(out / n) for n in names}
    assert run_main(style_transfer_folder, args + ["--skip_existing"]) == 0
    assert before == {n: os.path.getmtime(out / n) for n in names}


def make_bad_folder(folder):
    folder.mkdir()
    shutil.copy(os.path.join(FACES, sorted(os.listdir(FACES))[0]), folder / "good.jpg")
    rgb = Image.open(os.path.join(FACES, sorted(os.listdir(FACES))[1])).convert("RGB")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    rgb.save(folder / "good16.png")
    arr16 = (np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
    Image.fromarray(arr16).save(folder / "grey16.png")
    png = (folder / "good16.png").read_bytes()
    (folder / "corrupt.png").write_bytes(png[:40] + bytes(200) + png[240:])
    jpg = (folder / "good.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpg[: len(jpg) // 3])
    (folder / "notes.png").write_text("this is a text file\n")
    (folder / "empty.jpg").write_bytes(b"")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(folder / "tiny.png")
    shutil.copy(folder / "good16.png", folder / "good.png")  # good.jpg's name: its outputs would overwrite
    return {"corrupt.png", "truncated.jpg", "notes.png", "empty.jpg", "tiny.png", "good.png"}


def test_bad_inputs_are_named_and_skipped(ckpts, tmp_path, capsys):
    ckpt, psp_ckpt = ckpts
    bad = make_bad_folder(tmp_path / "faces")
    out = tmp_path / "out"
    style = os.path.join(STYLES, sorted(os.listdir(STYLES))[0])
    code = run_main(style_transfer_folder, ["--ckpt", ckpt, "--psp_encoder_ckpt", psp_ckpt, "--input_img_path",
                                            tmp_path / "faces", "--style_img_path", style, "--outdir", out,
                                            "--device", "cpu"])
    err = capsys.readouterr()
    assert code == 0
    style_stem = os.path.splitext(os.path.basename(style))[0]
    assert sorted(os.listdir(out)) == sorted(f"{n}_v_{style_stem}.jpg" for n in ("good", "cmyk", "good16", "grey16"))
    for name in bad:
        assert name in err.err, name
    assert "4 stylized faces written, 6 input(s) skipped" in err.out
    assert "skipped " + str(tmp_path / "faces" / "good.png") + ": same name as good.jpg" in err.err
    for n in os.listdir(out):
        assert read_rgb(str(out / n)).shape == (SIZE, 3 * SIZE, 3)
    # nothing usable -> non-zero exit, no output
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    for name in bad - {"good.png"}:  # (without good.jpg, good.png is a usable face)
        shutil.copy(tmp_path / "faces" / name, only_bad / name)
    code = run_main(style_transfer_folder, ["--ckpt", ckpt, "--psp_encoder_ckpt", psp_ckpt, "--input_img_path",
                                            only_bad, "--style_img_path", style, "--outdir", tmp_path / "none",
                                            "--device", "cpu"])
    assert code == 1
    assert not (tmp_path / "none").exists() or not os.listdir(tmp_path / "none")


@pytest.mark.parametrize("script", ["style_transfer_folder", "generate_image_pairs", "gen_video"])
def test_non_finite_output_is_named_and_not_written(script, ckpts, tmp_path, capsys, monkeypatch):
    """A float16 overflow gives NaN pixels (seen on a GPU before PixelNorm / demodulation were computed in
    float32): such an output (image, or the video of that face) is not written as garbage; it is named with
    the reason and the batch goes on. The generator's first call returns one NaN pixel in its first image."""
    module = {"style_transfer_folder": style_transfer_folder, "generate_image_pairs": generate_image_pairs,
              "gen_video": gen_video}[script]
    ckpt, psp_ckpt = ckpts
    faces = tmp_path / "faces"
    faces.mkdir()
    for name in sorted(os.listdir(FACES))[:2]:
        shutil.copy(os.path.join(FACES, name), faces / name)
    real_load = module.load_blendgan
    calls = []

    def load_poisoned(*args, **kwargs):
        g, *rest = real_load(*args, **kwargs)
        forward = g.forward

        def first_call_nan(*a, **kw):
            img, latents = forward(*a, **kw)
            if not calls:
                img = img.clone()
                img[0, 0, 0, 0] = float("nan")
            calls.append(len(img))
            return img, latents

        g.forward = first_call_nan
        return (g, *rest)

    monkeypatch.setattr(module, "load_blendgan", load_poisoned)
    style = os.path.join(STYLES, sorted(os.listdir(STYLES))[0])
    style_stem = os.path.splitext(os.path.basename(style))[0]
    first, second = (os.path.splitext(n)[0] for n in sorted(os.listdir(faces)))
    out = tmp_path / "out"
    photos = ["--psp_encoder_ckpt", psp_ckpt, "--input_img_path", faces]
    argv, bad, good, summary = {
        "style_transfer_folder": (photos + ["--style_img_path", style, "--batch", 2], f"{first}_v_{style_stem}.jpg",
                                  f"{second}_v_{style_stem}.jpg", "1 stylized faces written"),
        "generate_image_pairs": (["--pics", 2, "--batch", 2], "000000.jpg", "000001.jpg", "1 pairs written"),
        "gen_video": (photos + ["--style_img_path", STYLES, "--n_styles", 2, "--batch", 32], f"{first}.mp4",
                      f"{second}.mp4", "1 videos written"),
    }[script]
    code = run_main(module, ["--ckpt", ckpt, "--outdir", out, "--device", "cpu"] + argv)
    err = capsys.readouterr()
    assert code == 0 and calls
    assert os.listdir(out) == [good]  # nothing of the bad output, not even a temporary file
    assert f"not written {out / bad}: non-finite values in the float32 image" in err.err
    assert f"{summary}, 0 input(s) skipped, 1 output(s) not written ({bad}: non-finite" in err.out
    if script == "gen_video":
        assert read_mp4(str(out / good))[0].shape == (31 + 10, SIZE, 3 * SIZE, 3)
    else:
        assert read_rgb(str(out / good)).shape[0] == SIZE


def test_missing_checkpoint_is_one_clear_line(tmp_path):
    r = subprocess.run([sys.executable, "generate_image_pairs.py", "--ckpt", str(tmp_path / "nope.pt"), "--pics", "1",
                        "--outdir", str(tmp_path / "o"), "--device", "cpu"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0
    lines = [line for line in r.stderr.strip().splitlines() if line]
    assert len(lines) == 1, r.stderr
    assert "nope.pt" in lines[0] and "pretrained_models/blendgan.pt" in lines[0] and "onion-liu/BlendGAN" in lines[0]


def test_a_stylegan2_file_as_ckpt_is_named_as_one(tmp_path):
    torch.manual_seed(0)
    g = Generator(16, 32, 2, channel_multiplier=1, load_pretrained_vgg=False)
    synthesis = synthesis_only(g)
    path = str(tmp_path / "stylegan2.pt")
    torch.save({"g_ema": synthesis}, path)
    with pytest.raises(CheckpointError) as e:
        load_blendgan(path)
    assert str(e.value) == (f"{path}['g_ema']: a StyleGAN2 generator without BlendGAN's style mapping and "
                            f"blending weights (no add_weight): train.py --stylegan2_ckpt starts from it")
    assert infer_generator_config(synthesis) == infer_generator_config(g.state_dict())  # read all the same


def test_photo_scripts_refuse_a_generator_pSp_codes_do_not_fit(ckpts, tmp_path, capsys):
    """A generator trained with --style_dim 16 renders 16-D W codes; pSp gives 512-D ones. The photo scripts
    refuse it with one line before reading any input (they used to die in the first blend, after the encoders);
    generate_image_pairs.py, which needs no pSp, still renders with it."""
    _, psp = ckpts
    torch.manual_seed(0)
    g = Generator(SIZE, 16, 2, channel_multiplier=1, load_pretrained_vgg=False)
    ckpt = tmp_path / "blendgan16.pt"
    torch.save({"g_ema": g.state_dict()}, ckpt)
    common = ["--ckpt", ckpt, "--psp_encoder_ckpt", psp, "--input_img_path", FACES, "--style_img_path", STYLES,
              "--device", "cpu"]
    for script in (style_transfer_folder, gen_video):
        out = tmp_path / script.__name__
        with pytest.raises(SystemExit) as exit_info:
            run_main(script, common + ["--outdir", out])
        message = str(exit_info.value.code)
        assert message.startswith(f"error: {ckpt}: a generator with style_dim 16 cannot stylize photos"), message
        assert "512-D" in message and "generate_image_pairs.py" in message
        assert not out.exists() or not os.listdir(out)
    out = tmp_path / "pairs"
    assert run_main(generate_image_pairs, ["--ckpt", ckpt, "--pics", 1, "--outdir", out, "--device", "cpu"]) == 0
    (name,) = os.listdir(out)
    assert read_rgb(str(out / name)).shape == (SIZE, 2 * SIZE, 3)


def test_output_folder_that_is_a_file_is_refused_when_parsing(tmp_path, capsys):
    """--outdir naming a file (or a folder below one) stops at parsing with one line, not with a traceback
    at the first write after minutes of work."""
    import align_faces

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    scripts = [generate_image_pairs, style_transfer_folder, gen_video, align_faces]
    for module, outdir in itertools.product(scripts, (a_file, a_file / "sub")):
        argv = ["--outdir", str(outdir)] + (["--input_img_path", FACES] if module is align_faces else [])
        with pytest.raises(SystemExit) as exit_info:
            module.parse_args(argv)
        assert exit_info.value.code == 2, module
        assert f"--outdir {outdir}: {a_file} is a file, not a folder" in capsys.readouterr().err, module
    assert generate_image_pairs.parse_args(["--outdir", str(tmp_path / "new" / "folder")])  # to be made: fine


def test_output_folder_that_is_an_input_folder_is_refused_when_parsing(capsys):
    """--outdir equal to a folder of inputs: the outputs would be taken as inputs by the next run (a
    mosaic of a mosaic; an .mp4 read as a style image) or, for align_faces.py, replace the photos."""
    import align_faces

    faces = FACES  # nothing is written: the options are refused
    cases = [(style_transfer_folder, "--input_img_path", faces), (style_transfer_folder, "--style_img_path", faces),
             (gen_video, "--input_img_path", faces), (gen_video, "--style_img_path", faces),
             (align_faces, "--input_img_path", faces), (align_faces, "--input_img_path", os.path.join(faces, "000000.jpg"))]
    for module, flag, path in cases:
        others = [] if module is align_faces else ["--input_img_path", STYLES, "--style_img_path", STYLES]
        with pytest.raises(SystemExit) as exit_info:
            module.parse_args(others + ["--outdir", faces, flag, path])
        assert exit_info.value.code == 2, (module, flag)
        assert f"--outdir {faces} is the {flag} folder {faces}: the outputs would" in capsys.readouterr().err
    assert style_transfer_folder.parse_args(["--outdir", os.path.join(faces, "out"), "--input_img_path", faces])
    import inference

    with pytest.raises(ValueError, match="output folder .* is the input folder"):  # a caller from Python
        inference.list_inputs(faces, outdir=faces + os.sep)


def test_folder_without_inputs_says_what_it_left_out(tmp_path):
    """Per-person subfolders and a dead link gave 'done: 0 ... written', exit 1, and no hint."""
    import inference

    (tmp_path / "anna").mkdir()
    (tmp_path / "bob").mkdir()
    os.symlink(tmp_path / "gone.jpg", tmp_path / "dead.jpg")
    (tmp_path / "README").write_text("photos")
    (tmp_path / ".hidden.jpg").write_bytes(b"x")
    (tmp_path / ".git").mkdir()
    with pytest.raises(FileNotFoundError) as error:
        inference.list_inputs(str(tmp_path))
    assert str(error.value) == (f"no input files in {tmp_path}: it holds 2 subfolder(s) (not searched: pass one as "
                                f"the folder), 1 dead link(s), 1 hidden file(s), 1 file(s) without an extension")
    (tmp_path / "anna" / "a.jpg").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=f"no input files in {tmp_path / 'bob'}: it is empty"):
        inference.list_inputs(str(tmp_path / "bob"))
    assert inference.list_inputs(str(tmp_path / "anna")) == [str(tmp_path / "anna" / "a.jpg")]


def test_generate_pairs_style_img_that_is_no_image_file_is_one_line_when_parsing(tmp_path, capsys):
    """It was named twice, after the generator had loaded ('skipped ...: Is a directory', then 'error: ...')."""
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    for path, problem in ((STYLES, "a folder, not an image file"), (tmp_path / "nope.jpg", "no such file"),
                          (text, "cannot decode image")):
        with pytest.raises(SystemExit) as exit_info:
            generate_image_pairs.parse_args(["--style_img", str(path)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and sum(str(path) in line for line in err.splitlines()) == 1
        assert f"error: --style_img {path}: {problem}" in err.strip().splitlines()[-1]


def test_style_walks_match_release_picks():
    release = {  # format notes Sec. 8: the release's picks for its test images (seed 0, sorted lists)
        "000000": "100032 100029 100016 100010 100019 100016 100030 100013",
        "000001": "100018 100022 100034 100019 100012 100029 100024 100010",
        "000015": "100034 100036 100031 100034 100013 100028 100033 100027",
        "000067": "100003 100020 100028 100020 100031 100020 100035 100024",
    }
    faces = sorted(os.listdir(FACES))
    styles = sorted(os.listdir(STYLES))
    walks = gen_video.style_walks(faces, styles, 8, 0)
    for face, names in release.items():
        assert [os.path.splitext(s)[0] for s in walks[face + ".jpg"]] == names.split()


def test_gen_video_frames_fps_and_layout(ckpts, tmp_path):
    ckpt, psp_ckpt = ckpts
    faces = tmp_path / "faces"
    faces.mkdir()
    shutil.copy(os.path.join(FACES, sorted(os.listdir(FACES))[0]), faces)
    out = tmp_path / "videos"
    assert run_main(gen_video, ["--ckpt", ckpt, "--psp_encoder_ckpt", psp_ckpt, "--input_img_path", faces,
                                "--style_img_path", STYLES, "--outdir", out, "--device", "cpu", "--n_styles", 2,
                                "--batch", 32]) == 0
    name = os.path.splitext(sorted(os.listdir(faces))[0])[0] + ".mp4"
    assert os.listdir(out) == [name]
    frames, fps, codec = read_mp4(str(out / name))
    assert frames.shape == ((2 - 1) * 31 + 10, SIZE, 3 * SIZE, 3)
    assert fps == 30 and "h264" in codec
    import imageio_ffmpeg

    probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-i", str(out / name)], capture_output=True, text=True)
    assert "h264" in probe.stderr and "yuv420p" in probe.stderr
    # the frames: face panel, the sliding window, and the generated result (H.264 is lossy: loose bound)
    face = resize(read_rgb(os.path.join(faces, sorted(os.listdir(faces))[0])), SIZE)
    styles = sorted(os.listdir(STYLES))
    picks = gen_video.style_walks([str(faces / sorted(os.listdir(faces))[0])], [os.path.join(STYLES, s) for s in styles],
                                  2, 0)
    walk = [resize(read_rgb(p), SIZE) for p in list(picks.values())[0]]
    alphas = interpolation_alphas()
    for t in (0, 12, 25):
        k, a = divmod(t, 31)
        window = sliding_window(walk[k], walk[k + 1], alphas[a])
        # H.264 at crf 18 on 64 px panels: a few levels of error; a wrong panel is off by tens
        assert np.abs(frames[t][:, :SIZE].astype(float) - face).mean() < 10
        assert np.abs(frames[t][:, SIZE:2 * SIZE].astype(float) - window).mean() < 10
        assert np.abs(frames[t][:, SIZE:2 * SIZE].astype(float) - face).mean() > 25
    assert np.abs(frames[-1].astype(float) - frames[-2]).mean() < 1  # the final hold
    assert np.abs(frames[30].astype(float) - frames[0]).mean() > 1  # the result moves between styles


def test_mp4_frames_with_odd_sides_are_padded_to_even(tmp_path):
    """yuv420p needs even sides: a 33 x 47 frame (write_mp4 called from Python) is scaled to 34 x 48, not refused."""
    frames = [np.full((33, 47, 3), 40 * k, np.uint8) for k in range(3)]
    assert write_mp4(tmp_path / "odd.mp4", frames) == 3
    decoded, fps, codec = read_mp4(str(tmp_path / "odd.mp4"))
    assert decoded.shape == (3, 34, 48, 3) and fps == 30 and "h264" in codec
    assert np.abs(decoded.astype(float).mean(axis=(1, 2, 3)) - [0, 40, 80]).max() < 2


def test_gen_video_holds_one_network_at_a_time_and_frames_are_unchanged(ckpts, tmp_path, monkeypatch):
    """gen_video.py sequenced like style_transfer_folder.py: pSp is never loaded while a generator with
    E_style is alive, and G is not alive while pSp encodes; the frames handed to the encoder are exactly
    those of the one-pass computation (G with E_style and pSp together, as the release)."""
    import gc
    import weakref

    import inference

    ckpt, psp_ckpt = ckpts
    faces = tmp_path / "faces"
    faces.mkdir()
    shutil.copy(os.path.join(FACES, sorted(os.listdir(FACES))[0]), faces)
    alive, overlaps, written = [], [], {}

    def live():
        gc.collect()
        return [kind for kind, ref in alive if ref() is not None]

    def tracking(kind, load):
        def wrapper(*args, **kwargs):
            overlaps.append((kind, live()))
            result = load(*args, **kwargs)
            net = result[0] if isinstance(result, tuple) else result
            alive.append((kind, weakref.ref(net)))
            return result
        return wrapper

    monkeypatch.setattr(gen_video, "load_blendgan", tracking("G", inference.load_blendgan))
    monkeypatch.setattr(gen_video, "load_psp", tracking("pSp", inference.load_psp))
    monkeypatch.setattr(gen_video, "write_mp4", lambda path, frames, **kw: written.update({path: list(frames)}))
    out = tmp_path / "videos"
    assert run_main(gen_video, ["--ckpt", ckpt, "--psp_encoder_ckpt", psp_ckpt, "--input_img_path", faces,
                                "--style_img_path", STYLES, "--outdir", out, "--device", "cpu", "--n_styles", 2,
                                "--batch", 16]) == 0
    assert overlaps == [("G", []), ("pSp", []), ("G", [])]  # nothing else alive when each one loads

    g, _ = inference.load_blendgan(ckpt)
    psp = inference.load_psp(psp_ckpt, SIZE)
    style_paths = [os.path.join(STYLES, s) for s in sorted(os.listdir(STYLES))]
    style_imgs = {p: resize(read_rgb(p), SIZE) for p in style_paths}
    z = dict(zip(style_paths, encode_styles(g, list(style_imgs.values()), 16, "cpu", torch.float32)))
    face_paths = [str(faces / n) for n in sorted(os.listdir(faces))]
    walks = gen_video.style_walks(face_paths, style_paths, 2, 0)
    opts = gen_video.parse_args(["--ckpt", ckpt, "--psp_encoder_ckpt", psp_ckpt, "--input_img_path", str(faces),
                                 "--style_img_path", STYLES, "--n_styles", "2", "--batch", "16"])
    assert sorted(written) == sorted(str(out / (os.path.splitext(os.path.basename(p))[0] + ".mp4"))
                                     for p in face_paths)
    for path in face_paths:
        face = resize(read_rgb(path), SIZE)
        code = encode_faces(psp, [face], 1, "cpu", torch.float32)
        want = list(gen_video.face_frames(g, code, face, [style_imgs[p] for p in walks[path]],
                                          [z[p] for p in walks[path]], opts))
        got = written[str(out / (os.path.splitext(os.path.basename(path))[0] + ".mp4"))]
        assert len(got) == len(want) == 31 + 10
        assert max(np.abs(a.astype(int) - b).max() for a, b in zip(got, want)) <= 1  # uint8 rounding at most


def test_compiled_networks_match_eager(ckpts):
    """--compile (torch.compile of the channels_last generator and pSp encoder) changes no output beyond
    1e-4 of its range."""
    ckpt, psp_ckpt = ckpts
    g, _ = load_blendgan(ckpt)
    g_c, _ = load_blendgan(ckpt, compile=True)
    psp, psp_c = load_psp(psp_ckpt, SIZE), load_psp(psp_ckpt, SIZE, compile=True)
    torch.manual_seed(1)
    z, z_embed = torch.randn(2, 512), torch.randn(2, 512)
    face = torch.rand(2, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        for kw in (dict(), dict(z_embed=z_embed, add_weight_index=6)):
            eager, compiled = g([z], randomize_noise=False, **kw)[0], g_c([z], randomize_noise=False, **kw)[0]
            assert (compiled - eager).abs().max() <= 1e-4 * eager.abs().max()
        codes, codes_c = psp(face), psp_c(face)  # [2, n_latent, 512]
        assert codes.shape == (2, g.n_latent, 512)
        assert (codes_c - codes).abs().max() <= 1e-4 * codes.abs().max()
    assert torch.equal(g_c.get_z_embed(face), g.get_z_embed(face))  # methods reach the wrapped module


def explicit_wbm(g, w_face, w_style, index, theta=None):
    """The blended W+ [N, n_latent, 512] written out layer by layer (paper Eq. 4-5 in the release's terms):
    A_j = the stored face weight clamped to [0, 1]; A_j = 1 for the layers j before the indicator (Python
    slicing: a negative index counts from the end, -n_latent forces none); theta at the boundary layer
    gives it the style weight theta * (1 - A_j). w_face: [N, 512] or W+; w_style: [N, 512]."""
    n = g.n_latent
    first = index if index >= 0 else n + index  # the first layer that is not forced to the face code
    layers = []
    for j in range(n):
        a = float(g.add_weight[0, j, 0].clamp(0, 1))
        if j < first:
            a = 1.0
        elif j == first and theta is not None:
            a = 1 - theta * (1 - a)
        face = w_face[:, j] if w_face.ndim == 3 else w_face
        layers.append(face * a + w_style * (1 - a))
    return torch.stack(layers, 1)


def synthesize(g, w_plus):
    """The image of an explicit W+ code: no mapping, truncation or blending inside the forward."""
    with torch.no_grad():
        return ten2img(g([w_plus], input_is_latent=True, randomize_noise=False)[0])


def test_generate_pairs_centre_without_latent_avg_and_checkpoint_truncation(ckpts, tmp_path, monkeypatch):
    """No 'latent_avg' in the checkpoint (it is optional): the centre is the mean of the FACE mapping over
    --truncation_mean codes drawn first from the seeded CPU generator; the checkpoint's 'truncation'
    overrides --truncation (format notes Sec. 1)."""
    ckpt, _ = ckpts
    real_load = generate_image_pairs.load_blendgan

    def load_without_avg(*args, **kwargs):  # the checkpoint as read, without rewriting its 1.3 GB
        g, c = real_load(*args, **kwargs)
        c = {k: v for k, v in c.items() if k != "latent_avg"}
        return g, {**c, "truncation": 0.5}

    monkeypatch.setattr(generate_image_pairs, "load_blendgan", load_without_avg)
    out = tmp_path / "out"
    assert run_main(generate_image_pairs, ["--ckpt", ckpt, "--pics", 2, "--batch", 2, "--seed", 5,
                                           "--truncation", 0.9, "--truncation_mean", 64, "--outdir", out,
                                           "--device", "cpu"]) == 0
    g, _ = load_blendgan(ckpt, with_style_encoder=False)
    rng = torch.Generator().manual_seed(5)
    with torch.no_grad():
        centre_z = torch.randn(64, 512, generator=rng)  # drawn before the style code and the face codes
        z_embed = torch.randn(1, 512, generator=rng)
        z = torch.cat([torch.randn(1, 512, generator=rng) for _ in range(2)])  # [2, 512]
        centre = g.style(centre_z).mean(0)  # [512]
        w_face = centre + 0.5 * (g.style(z) - centre)  # [2, 512]
        natural = synthesize(g, w_face[:, None].repeat(1, g.n_latent, 1))
        stylized = synthesize(g, explicit_wbm(g, w_face, g.embedding(z_embed), 6))
        untruncated = synthesize(g, g.style(z)[:, None].repeat(1, g.n_latent, 1))
    for k in range(2):
        got = read_rgb(str(out / f"{k:06d}.jpg"))
        assert np.abs(got - jpeg_roundtrip(np.concatenate([natural[k], stylized[k]], axis=1))).mean() < 0.5, k
        assert np.abs(natural[k].astype(float) - untruncated[k]).mean() > 3.0  # the truncation really acts


def pairs_codes(ckpt, seed):
    """What generate_image_pairs.py draws for one latent-guided pair with --seed ``seed`` (CPU generator:
    the style code, then the face code) at the default --truncation 0.75 around the checkpoint's latent_avg:
    (g, w_face [1, 512], w_style [1, 512])."""
    g, c = load_blendgan(ckpt, with_style_encoder=False)
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z_embed = torch.randn(1, 512, generator=rng)
        z = torch.randn(1, 512, generator=rng)
        centre = c["latent_avg"][0]  # [512]
        w_face = centre + 0.75 * (g.style(z) - centre)
        return g, w_face, g.embedding(z_embed)


def test_generate_pairs_theta_weights_the_boundary_layer(ckpts, tmp_path):
    """--theta (paper Eq. 5) reaches the generator: the boundary layer i gets the style weight theta * alpha_i."""
    ckpt, _ = ckpts
    out = tmp_path / "out"
    assert run_main(generate_image_pairs, ["--ckpt", ckpt, "--pics", 1, "--seed", 2, "--add_weight_index", 4,
                                           "--theta", 0.2, "--outdir", out, "--device", "cpu"]) == 0
    g, w_face, w_style = pairs_codes(ckpt, 2)
    with torch.no_grad():
        natural = synthesize(g, w_face[:, None].repeat(1, g.n_latent, 1))[0]
        with_theta = synthesize(g, explicit_wbm(g, w_face, w_style, 4, theta=0.2))[0]
        without = synthesize(g, explicit_wbm(g, w_face, w_style, 4))[0]
    got = read_rgb(str(out / "000000.jpg"))
    assert np.abs(got - jpeg_roundtrip(np.concatenate([natural, with_theta], axis=1))).mean() < 0.5
    assert np.abs(got[:, SIZE:] - without.astype(float)).mean() > 2.0  # theta changes the stylized half


def test_style_transfer_folder_theta_weights_the_boundary_layer(ckpts, tmp_path):
    """--theta reaches style_transfer_folder.py's generator as well (W+ face codes from pSp)."""
    ckpt, psp_ckpt = ckpts
    face_path = os.path.join(FACES, sorted(os.listdir(FACES))[0])
    style_path = os.path.join(STYLES, sorted(os.listdir(STYLES))[1])
    out = tmp_path / "out"
    assert run_main(style_transfer_folder, ["--ckpt", ckpt, "--psp_encoder_ckpt", psp_ckpt, "--input_img_path",
                                            face_path, "--style_img_path", style_path, "--outdir", out,
                                            "--add_weight_index", 4, "--theta", 0.2, "--device", "cpu"]) == 0
    g, _ = load_blendgan(ckpt)
    psp = load_psp(psp_ckpt, SIZE)
    face, style = read_rgb(face_path), read_rgb(style_path)
    with torch.no_grad():
        codes = psp(img2ten(face))  # [1, n_latent, 512]
        w_style = g.embedding(g.get_z_embed(img2ten(style)))  # [1, 512]
        with_theta = synthesize(g, explicit_wbm(g, codes, w_style, 4, theta=0.2))[0]
        without = synthesize(g, explicit_wbm(g, codes, w_style, 4))[0]
    got = read_rgb(str(out / f"{stem(face_path)}_v_{stem(style_path)}.jpg"))
    expected = jpeg_roundtrip(np.concatenate([resize(face, SIZE), resize(style, SIZE), with_theta], axis=1))
    assert np.abs(got - expected).mean() < 0.5
    assert np.abs(got[:, 2 * SIZE:] - without.astype(float)).mean() > 2.0  # theta changes the result


def test_indicator_minus_n_latent_is_python_slicing(ckpts, tmp_path, capsys):
    """--add_weight_index -n_latent (-10 at 64 px) is inside the accepted range (no note) and, as the
    release's A[:, :-10] = 1, forces no layer to the face code: every layer blended, the same files as 0."""
    ckpt, _ = ckpts
    files = {}
    for index in (-10, 0):
        out = tmp_path / f"i{index}"
        capsys.readouterr()
        assert run_main(generate_image_pairs, ["--ckpt", ckpt, "--pics", 1, "--seed", 4, "--add_weight_index", index,
                                               "--outdir", out, "--device", "cpu"]) == 0
        assert "add_weight_index" not in capsys.readouterr().err, index
        files[index] = (out / "000000.jpg").read_bytes()
    assert files[-10] == files[0]
    g, w_face, w_style = pairs_codes(ckpt, 4)
    with torch.no_grad():
        a = g.add_weight.clamp(0, 1)  # [1, n_latent, 1]: the learned weights on every layer
        w_plus = w_face[:, None] * a + w_style[:, None] * (1 - a)
        stylized = synthesize(g, w_plus)[0]
        at_six = synthesize(g, explicit_wbm(g, w_face, w_style, 6))[0]
    got = read_rgb(str(tmp_path / "i-10" / "000000.jpg"))[:, SIZE:]
    assert np.abs(got - jpeg_roundtrip(stylized)).mean() < 0.5
    assert np.abs(got - at_six.astype(float)).mean() > 2.0  # not the default indicator's image


def block_mean(rgb, factor):
    """uint8 [H, W, 3] -> float64 [3, H / factor, W / factor] in [-1, 1]: the mean of each factor x factor block."""
    x = (rgb.astype(np.float64) / 255 - 0.5) / 0.5
    h, w = x.shape[0] // factor, x.shape[1] // factor
    return x.reshape(h, factor, w, factor, 3).mean(axis=(1, 3)).transpose(2, 0, 1)


def random_faces(n, side, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(n)]


def test_pooled_batches_average_blocks_to_the_pool_size():
    images = random_faces(3, 512, 0) + random_faces(1, 768, 1)
    got = list(pooled_batches(images, 256, 3, "cpu", torch.float32))
    assert [tuple(b.shape) for b in got] == [(3, 3, 256, 256), (1, 3, 256, 256)]
    pooled = torch.cat(got).numpy()
    for i, (im, factor) in enumerate(zip(images, (2, 2, 2, 3))):
        np.testing.assert_allclose(pooled[i], block_mean(im, factor), rtol=0, atol=1e-5, err_msg=str(i))


def test_encode_faces_and_styles_feed_their_encoders_block_averages():
    images = random_faces(3, 512, 2)
    seen = []

    def psp(x):
        seen.append(x.clone())
        return torch.zeros(len(x), 10, 512)

    assert tuple(encode_faces(psp, images, 2, "cpu", torch.float32).shape) == (3, 10, 512)
    faces = torch.cat(seen).numpy()
    assert faces.shape == (3, 3, 256, 256)  # pSp's input size: every 512 px face is averaged 2 x 2
    for i, im in enumerate(images):
        np.testing.assert_allclose(faces[i], block_mean(im, 2), rtol=0, atol=1e-5, err_msg=str(i))
    seen.clear()
    pool = types.SimpleNamespace(output_size=(128, 128))
    g = types.SimpleNamespace(embedder=types.SimpleNamespace(embedder=types.SimpleNamespace(avg_pool=pool)),
                              style_dim=4, get_z_embed=lambda x: seen.append(x.clone()) or torch.zeros(len(x), 4))
    assert tuple(encode_styles(g, images, 2, "cpu", torch.float32).shape) == (3, 4)
    styles = torch.cat(seen).numpy()
    assert styles.shape == (3, 3, 128, 128)
    for i, im in enumerate(images):
        np.testing.assert_allclose(styles[i], block_mean(im, 4), rtol=0, atol=1e-5, err_msg=str(i))


def test_transfer_keeps_inputs_pooled_as_read_and_they_encode_as_the_full_images(tmp_path):
    """style_transfer_folder holds each face/style as its encoder's pooled input, not at full resolution;
    the batches the encoders get are those of the full images (pooling a pooled image is the identity)."""
    images = random_faces(2, 512, 3)
    paths = []
    for i, im in enumerate(images):
        paths.append(str(tmp_path / f"im{i}.png"))
        Image.fromarray(im).save(paths[-1])
    report = style_transfer_folder.Report()
    stems, kept, thumbs = style_transfer_folder.read_all(paths, report, 64, 128)
    assert stems == ["im0", "im1"] and not report.skipped
    assert [tuple(k.shape) for k in kept] == [(1, 3, 128, 128)] * 2 and [t.shape for t in thumbs] == [(64, 64, 3)] * 2
    for k, im in zip(kept, images):
        np.testing.assert_allclose(k[0].numpy(), block_mean(im, 4), rtol=0, atol=1e-5)
    for a, b in zip(pooled_batches(kept, 128, 2, "cpu", torch.float32),
                    pooled_batches(images, 128, 2, "cpu", torch.float32)):
        assert torch.equal(a, b)


def test_interpolation_alphas_are_the_release_sigmoid_schedule():
    expected = [0.0] + [1 / (1 + math.exp(-(-5.0 + 0.5 * i))) for i in range(20)] + [1.0] * 10
    got = interpolation_alphas()
    assert len(got) == 31
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert abs(got[1] - 0.0066928509242848554) < 1e-12  # sigmoid(-5)
    assert got[11] == 0.5  # sigmoid(0)


def test_sliding_window_moves_from_previous_to_next_style():
    h, w = 8, 3
    prev = np.repeat(np.arange(h, dtype=np.uint8)[:, None, None], w, axis=1).repeat(3, axis=2)  # row r: value r
    nxt = prev + 100
    np.testing.assert_array_equal(sliding_window(prev, nxt, 0.0), prev)
    np.testing.assert_array_equal(sliding_window(prev, nxt, 1.0), nxt)
    half = sliding_window(prev, nxt, 0.5)  # prev's lower half above next's upper half
    np.testing.assert_array_equal(half[:, 0, 0], [4, 5, 6, 7, 100, 101, 102, 103])
    np.testing.assert_array_equal(sliding_window(prev, nxt, 0.9)[:, 0, 0], [7, 100, 101, 102, 103, 104, 105, 106])


def test_face_frames_walk_from_each_style_to_the_next():
    side = 8
    z_styles = torch.tensor([[-0.5, 1.0], [0.5, 2.0], [-1.0, 3.0]])  # result image value: first coordinate
    calls = []

    def g(codes, z_embed, **kwargs):
        calls.append(z_embed.clone())
        return z_embed[:, :1].view(-1, 1, 1, 1).expand(-1, 3, side, side).clone(), None

    colours = (10, 120, 230)
    style_imgs = [np.full((side, side, 3), c, dtype=np.uint8) for c in colours]
    face = np.full((side, side, 3), 60, dtype=np.uint8)
    opts = types.SimpleNamespace(batch=4, add_weight_index=7, theta=None, dtype="float32")
    frames = list(gen_video.face_frames(g, torch.zeros(1, 4, 512), face, style_imgs, z_styles, opts))
    assert len(frames) == 2 * 31 + 10
    first = [0.0] + [1 / (1 + math.exp(5.0 - 0.5 * i)) for i in range(3)]  # the first four alphas
    expected = torch.stack([z_styles[0] + a * (z_styles[1] - z_styles[0]) for a in first])
    assert torch.equal(calls[0][0], z_styles[0])
    torch.testing.assert_close(calls[0], expected, rtol=0, atol=1e-6)

    def result(t):
        return frames[t][:, 2 * side:]

    def window(t):
        return frames[t][:, side:2 * side].astype(int)

    for t, value, colour in [(0, -0.5, 10), (30, 0.5, 120), (31, 0.5, 120), (61, -1.0, 230), (71, -1.0, 230)]:
        assert (result(t) == int((value * 0.5 + 0.5) * 255)).all(), t
        assert (np.abs(window(t) - colour) <= 1).all(), t
    assert (np.abs(window(11)[:4] - 10) <= 1).all() and (np.abs(window(11)[4:] - 120) <= 1).all()  # alpha 0.5


def test_generate_pairs_stops_at_a_full_disk_with_one_line_and_whole_files(ckpts, tmp_path, small_disk):
    """Going on to the next pictures on a full disk is pointless: the run stops there, exit code 1, the pictures
    before it whole (the same bytes as on a disk with room), no temporary left."""
    ckpt, _ = ckpts
    args = ["--ckpt", ckpt, "--pics", 6, "--seed", 3, "--batch", 3, "--device", "cpu"]
    assert run_main(generate_image_pairs, args + ["--outdir", tmp_path / "room"]) == 0
    fill_disk(small_disk, 20 * 1024)  # room for a few of the 64 x 128 px JPEGs (two or three 4 KiB pages each)
    out = small_disk / "pairs"
    with pytest.raises(SystemExit) as stop:
        run_main(generate_image_pairs, args + ["--outdir", out])
    written = sorted(os.listdir(out))
    assert 0 < len(written) < 6 and written == [f"{i:06d}.jpg" for i in range(len(written))]
    assert stop.value.code == (f"error: cannot write {out / f'{len(written):06d}.jpg'}: the disk is full (0 MiB "
                               f"free in {out}); no part of it was left there")
    assert all((out / name).read_bytes() == (tmp_path / "room" / name).read_bytes() for name in written)
