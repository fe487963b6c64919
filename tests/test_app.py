"""app.py, the web demo: through its API (gradio_client), in a real browser (headless Chromium driven by
Selenium), and started without checkpoints. CPU, the size-64 release-layout checkpoints of
test_inference.py."""
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import app
import style_transfer_folder
from fileio import DiskFullError
from inference import Report, encode_faces, encode_styles, load_blendgan, load_psp, read_input
from test_inference import FACES, ROOT, SIZE, STYLES, ckpts, jpeg_roundtrip, read_rgb  # noqa: F401 (ckpts: fixture)
from utils import ten2img
from video import interpolation_alphas, read_mp4

FACE = os.path.join(FACES, "000001.jpg")
STYLE = os.path.join(STYLES, "100003.jpg")
N_LATENT = 10  # at 64 px
SCREENSHOT = os.path.join(ROOT, "docs", "demo_screenshot.png")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url, proc=None, timeout=90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"app exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.read().decode()
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer in {timeout} s")


def decode_png(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def read_png(path):
    with open(path, "rb") as f:
        return decode_png(f.read())


@pytest.fixture(scope="module")
def server(ckpts):
    """The app served in this process on a free port, float32 (comparable with the scripts)."""
    ckpt, psp_ckpt = ckpts
    port = free_port()
    opts = app.parse_args(["--ckpt", ckpt, "--psp_encoder_ckpt", psp_ckpt, "--device", "cpu", "--dtype", "float32",
                           "--port", str(port)])
    demo = app.BlendGANDemo(opts).load()
    assert demo.error is None
    page = app.build_demo(demo)
    app.launch(page, opts, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    wait_for_http(url)
    yield url, demo
    page.close()


def client_for(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def reference_result(ckpt, psp_ckpt, face_path, style_path, index):
    """What style_transfer_folder.py computes for one pair, with its own functions (float32, batch 1)."""
    g = load_blendgan(ckpt)[0]
    psp = load_psp(psp_ckpt, g.size)
    report = Report()
    face, style = read_input(face_path, report), read_input(style_path, report)
    with torch.no_grad():
        z = encode_styles(g, [style], 1, "cpu", torch.float32)
        code = encode_faces(psp, [face], 1, "cpu", torch.float32)
        out = g([code], z_embed=z, add_weight_index=index, input_is_latent=True, randomize_noise=False)[0]
    return ten2img(out)[0]


def test_api_matches_style_transfer_folder(server, ckpts, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    url, demo = server
    ckpt, psp_ckpt = ckpts
    client = client_for(url)
    sliders = dict(index=4, theta=1, truncation=0.75)
    client.predict(handle_file(FACE), *sliders.values(), api_name="/set_face")
    preview, full, blended, natural, status = client.predict(handle_file(STYLE), *sliders.values(),
                                                             api_name="/set_style")
    assert "000001.jpg" in status and "100003.jpg" in status
    full, blended, natural = read_png(full), read_png(blended), read_png(natural)
    assert blended.shape == full.shape == natural.shape == (SIZE, SIZE, 3)
    expected = reference_result(ckpt, psp_ckpt, FACE, STYLE, 4)
    assert np.abs(blended.astype(int) - expected).max() <= 1
    # and the script itself (its JPEG mosaic [face | style | result], quality 95)
    faces, styles, out = tmp_path / "f", tmp_path / "s", tmp_path / "out"
    faces.mkdir(), styles.mkdir()
    shutil.copy(FACE, faces), shutil.copy(STYLE, styles)
    assert style_transfer_folder.main(["--ckpt", ckpt, "--psp_encoder_ckpt", psp_ckpt, "--input_img_path", str(faces),
                                       "--style_img_path", str(styles), "--outdir", str(out), "--device", "cpu",
                                       "--add_weight_index", "4"]) == 0
    script = read_rgb(str(out / "000001_v_100003.jpg"))[:, 2 * SIZE:].astype(float)
    assert np.abs(script - jpeg_roundtrip(np.concatenate([natural, natural, blended], axis=1))[:, 2 * SIZE:]).mean() < 0.5
    # the indicator re-renders only the blended image, from the cached codes (no encoder runs);
    # i = n_latent is the natural face, i = 0 the full style
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in (demo.psp, demo.g.embedder)]
    try:
        assert np.array_equal(read_png(client.predict(N_LATENT, 1, 0.75, api_name="/blend_indicator")), natural)
        at0 = read_png(client.predict(0, 1, 0.75, api_name="/blend_indicator"))
        assert np.array_equal(at0, full)
        assert np.abs(at0.astype(float) - natural).mean() > 3  # the style really acts
        # theta < 1 moves layer i back towards the face
        half = read_png(client.predict(4, 0.5, 0.75, api_name="/blend_theta"))
        assert 0 < np.abs(half.astype(float) - blended).mean() < np.abs(natural.astype(float) - blended).mean()
    finally:
        for hook in hooks:
            hook.remove()
    assert not calls

    # a random face: seed s -> z_f, the first N(0, I) draw of torch.Generator().manual_seed(s)
    *_, natural_r, status, next_seed = client.predict(5, 6, 1, 0.75, api_name="/random_face")
    assert next_seed == 6 and "seed 5" in status
    g, c = load_blendgan(ckpt)
    z_f = torch.randn(1, 512, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = ten2img(g([z_f], truncation=0.75, truncation_latent=c["latent_avg"], randomize_noise=False)[0])[0]
    assert np.abs(read_png(natural_r).astype(int) - ref).max() <= 1

    # the interpolation clip from the current style to a bundled one: H.264, gen_video's frame layout
    # [face | sliding style window | result], its schedule at fewer frames
    start = read_png(client.predict(6, 1, 0.75, api_name="/blend_indicator"))
    video = client.predict("100000.jpg", 0, 6, 1, 0.75, api_name="/clip")
    path = video["video"] if isinstance(video, dict) else video
    frames, fps, codec = read_mp4(path)
    assert "h264" in codec and fps == app.CLIP_FPS
    n_frames = len(interpolation_alphas(step=app.CLIP_STEP, len_tail=app.CLIP_TAIL))
    assert n_frames == 16 and frames.shape == (n_frames, SIZE, 3 * SIZE, 3)
    end_style = os.path.join(STYLES, "100000.jpg")
    end = read_png(client.predict(handle_file(end_style), 6, 1, 0.75, api_name="/set_style")[2])
    panels = lambda frame: [frame[:, k * SIZE:(k + 1) * SIZE].astype(float) for k in range(3)]  # noqa: E731
    # H.264 at crf 18 on 64 px panels: a few levels of error; a wrong panel is off by tens
    for frame, style_path, result in ((frames[0], STYLE, start), (frames[-1], end_style, end)):
        face_panel, window, result_panel = panels(frame)
        assert np.abs(face_panel - read_png(natural_r)).mean() < 10
        assert np.abs(window - cv2.resize(read_rgb(style_path), (SIZE, SIZE))).mean() < 10
        assert np.abs(result_panel - result).mean() < 10
    assert np.abs(panels(frames[0])[1] - panels(frames[-1])[1]).mean() > 20  # the window slid to the other style

    # readable errors
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(AppError, match="notes.png: not an image file"):
        client.predict(handle_file(str(bad)), 6, 1, 0.75, api_name="/set_face")
    faceless = tmp_path / "wall.png"
    Image.fromarray(np.full((120, 200, 3), 128, np.uint8)).save(faceless)
    with pytest.raises(AppError, match="wall.png: no face found"):
        client.predict(handle_file(str(faceless)), 6, 1, 0.75, api_name="/set_face")
    huge = tmp_path / "huge.png"
    Image.new("L", (8000, 7000)).save(huge)  # 56 Mpx, a small file: refused from its header, not decoded
    with pytest.raises(AppError, match="huge.png: 8000x7000 px is too large"):
        client.predict(handle_file(str(huge)), 6, 1, 0.75, api_name="/set_style")


def test_truncation_centre_without_latent_avg_is_the_same_in_every_launch(ckpts, tmp_path):
    """A checkpoint without latent_avg: the centre is the mean of 4096 seeded face codes, so a random face
    of a given seed looks the same after a restart (it came from the unseeded global RNG)."""
    ckpt, psp_ckpt = ckpts
    bare = tmp_path / "no_latent_avg.pt"
    torch.save({"g_ema": torch.load(ckpt, weights_only=True)["g_ema"]}, bare)
    opts = app.parse_args(["--ckpt", str(bare), "--psp_encoder_ckpt", psp_ckpt, "--device", "cpu"])
    centres = []
    for seed in (1, 2):
        torch.manual_seed(seed)  # whatever the global RNG holds
        demo = app.BlendGANDemo(opts).load()
        assert demo.error is None
        centres.append(demo.latent_avg)
    z = torch.randn(4096, demo.g.style_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = demo.g.style(z).mean(0, keepdim=True)
    assert torch.equal(centres[0], centres[1]) and torch.equal(centres[0], expected)


def test_a_generator_pSp_codes_do_not_fit_takes_random_faces_and_names_why_not_photos(ckpts, tmp_path):
    """A generator trained with --style_dim 16: the demo starts and renders random faces and styles; a face
    photo (512-D pSp codes) is refused with the reason instead of failing inside the generator."""
    from model import Generator

    _, psp_ckpt = ckpts
    torch.manual_seed(0)
    ckpt = tmp_path / "blendgan16.pt"
    torch.save({"g_ema": Generator(SIZE, 16, 2, channel_multiplier=1, load_pretrained_vgg=False).state_dict()}, ckpt)
    demo = app.BlendGANDemo(app.parse_args(["--ckpt", str(ckpt), "--psp_encoder_ckpt", psp_ckpt,
                                            "--device", "cpu"])).load()
    assert demo.error is None
    image = demo.forward(demo.random_face(3), demo.random_style(4)[0], 6, 1.0, 0.75)
    assert image.shape == (1, 3, SIZE, SIZE) and torch.isfinite(image).all()
    with pytest.raises(app.DemoError, match=f"{ckpt}: a generator with style_dim 16 cannot stylize photos.*"
                                            "random faces work with it"):
        demo.face_from_photo(os.path.join(FACES, sorted(os.listdir(FACES))[0]))


def test_starts_without_checkpoints_and_names_them_and_cleans_up_on_sigterm(tmp_path):
    port = free_port()
    missing = tmp_path / "blendgan.pt"
    temp = tmp_path / "temp"  # the app's TMPDIR: its clips folder goes here
    temp.mkdir()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "app.py"), "--ckpt", str(missing),
                             "--psp_encoder_ckpt", str(tmp_path / "psp.pt"), "--device", "cpu", "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "TMPDIR": str(temp)})
    try:
        config = wait_for_http(f"http://127.0.0.1:{port}/config", proc)
        assert f"{missing} (--ckpt)" in config
        assert "python download_models.py blendgan.pt psp_encoder.pt" in config
        from gradio_client import Client, handle_file
        from gradio_client.exceptions import AppError

        with pytest.raises(AppError, match="download_models.py"):
            Client(f"http://127.0.0.1:{port}/", verbose=False).predict(handle_file(FACE), 6, 1, 0.75,
                                                                        api_name="/set_face")
        assert any(temp.glob("blendgan_app_*"))  # made at start, in TMPDIR
    finally:
        proc.terminate()  # SIGTERM: stops as on Ctrl-C
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert list(temp.glob("blendgan_app_*")) == []


@pytest.fixture(scope="module")
def chromium():
    """(browser, chromedriver) paths of Debian's chromium; the test is skipped when they are absent, except
    under CI, where .ci/run installs both. Requested before `server`, so a skip starts no app."""
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        if os.environ.get("CI"):
            pytest.fail("CI: chromium and chromium-driver must be installed (apt-get install chromium chromium-driver)")
        pytest.skip("chromium / chromedriver not installed")
    return browser, driver


def chromium_driver(chromium, download_dir):
    """Headless Chromium through chromedriver, downloads going to download_dir."""
    browser, driver = chromium
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1500"]:
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(download_dir),
                                              "download.prompt_for_download": False})
    return webdriver.Chrome(service=Service(driver), options=options)


def shown_image(driver, elem_id):
    """The PNG an output image shows (fetched from its src), or None; the browser must have decoded it too."""
    imgs = driver.find_elements("css selector", f"#{elem_id} img")
    if not imgs or not imgs[0].get_attribute("src"):
        return None
    if not driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", imgs[0]):
        return None
    with urllib.request.urlopen(imgs[0].get_attribute("src"), timeout=10) as r:
        return decode_png(r.read())


def wait_until(condition, timeout=60, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value is not None and value is not False and not (isinstance(value, list) and not value):
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def test_browser_upload_slider_download_errors(chromium, server, tmp_path):
    from selenium.webdriver.common.keys import Keys

    url, demo = server
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = chromium_driver(chromium, downloads)
    try:
        driver.get(url)
        upload = lambda elem_id, path: driver.find_element(  # noqa: E731
            "css selector", f"#{elem_id} input[type=file]").send_keys(path)
        wait_until(lambda: driver.find_elements("css selector", "#face-upload input[type=file]"), what="the page")
        upload("face-upload", FACE)
        natural = wait_until(lambda: shown_image(driver, "out-natural"), what="the natural face")
        upload("style-upload", STYLE)
        blended = wait_until(lambda: shown_image(driver, "out-blended"), what="the blended image")
        full = wait_until(lambda: shown_image(driver, "out-full"), what="the full-style image")
        assert blended.shape == full.shape == natural.shape == (SIZE, SIZE, 3)
        assert np.abs(full.astype(float) - natural).mean() > 3
        # the slider: i from 6 to 10 (= n_latent, the natural face) with the keyboard
        slider = driver.find_element("css selector", "#indicator input[type=range]")
        slider.send_keys(*[Keys.ARROW_RIGHT] * 4)
        assert not np.array_equal(blended, natural)
        moved = wait_until(lambda: (lambda b: b if b is not None and np.array_equal(b, natural) else None)(
            shown_image(driver, "out-blended")), timeout=30, what="the blended image to become the natural face")
        assert np.array_equal(shown_image(driver, "out-full"), full)  # not re-rendered differently
        # download of the blended image: a PNG at full resolution, the pixels shown
        driver.find_element("css selector", "#out-blended button[aria-label='Download'], "
                                            "#out-blended a[download] button, #out-blended a[download]").click()
        def finished_download():
            names = os.listdir(downloads)
            if len(names) != 1 or names[0].endswith(".crdownload") or not os.path.getsize(downloads / names[0]):
                return None  # Chrome writes a .crdownload file and renames it when complete
            return str(downloads / names[0])
        path = wait_until(finished_download, what="the download")
        assert np.array_equal(read_png(path), moved)
        wait_until(lambda: not driver.find_elements("css selector", ".wrap:not(.hide)[data-testid='status-tracker']"),
                   what="the queue to empty")
        driver.save_screenshot(str(tmp_path / "demo.png"))
        if os.environ.get("UPDATE_SCREENSHOT"):
            os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
            shutil.copy(tmp_path / "demo.png", SCREENSHOT)
        # a bundled style, clicked in the gallery; then the interpolation clip, played by the browser (H.264)
        driver.find_elements("css selector", "#style-gallery .thumbnail-item")[1].click()
        wait_until(lambda: "style: 100001.jpg" in driver.find_element("css selector", "#status").text,
                   what="the gallery pick")
        driver.find_element("css selector", "#make-clip").click()
        video = wait_until(lambda: driver.find_elements("css selector", "#clip video[src]"), what="the clip")[0]
        size = wait_until(lambda: driver.execute_script(
            "const v = arguments[0]; return v.readyState >= 2 && v.videoWidth ? [v.videoWidth, v.videoHeight] : null",
            video), timeout=30, what="the browser to decode the clip")
        assert size == [3 * SIZE, SIZE]
        # a non-image upload: a readable message in the page
        bad = tmp_path / "notes.txt"
        bad.write_text("not an image")
        driver.find_element("css selector", "#face-upload button[aria-label='Clear']").click()
        wait_until(lambda: driver.find_elements("css selector", "#face-upload input[type=file]"), what="an empty upload")
        upload("face-upload", str(bad))
        wait_until(lambda: "notes.txt: not an image file" in driver.find_element("tag name", "body").text,
                   what="the error message")
    finally:
        driver.quit()


def test_import_is_light():
    """Importing app loads no Gradio, no network and no checkpoint (the tests and other modules import it)."""
    code = ("import sys, app; assert 'gradio' not in sys.modules, 'gradio imported'; "
            "assert not [m for m in sys.modules if m.startswith('selenium')]")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_page_callbacks_turn_expected_errors_into_one_line_and_others_into_unexpected(capsys):
    """A DemoError or a full disk (the clip's mp4) is its own text in the page; anything else is 'unexpected error'
    in the page and a traceback on the server."""
    import gradio as gr

    def failing(error):
        @app.user_errors
        def callback():
            raise error
        return callback

    for error in (app.DemoError("no face photo given"), DiskFullError("cannot write clip.mp4: the disk is full")):
        with pytest.raises(gr.Error) as failure:
            failing(error)()
        assert failure.value.message == str(error)
    assert capsys.readouterr().err == ""
    with pytest.raises(gr.Error) as failure:
        failing(KeyError("frame"))()
    assert failure.value.message == "unexpected error: KeyError: 'frame'"
    assert "Traceback" in capsys.readouterr().err
