"""BlendGAN web demo (Gradio): stylize a face photo with a style image in the browser.

    python app.py                                  # then open http://127.0.0.1:7860
    python app.py --device cuda --port 8000        # --share for a public gradio.live link

The release's notebook GUI (BlendGANGUI.py) as a web page. Upload a face photo and a style image, pick
bundled ones, or draw random ones; move the indicator i; see [full style | blended at i | natural face].
A square 256/512/1024 px face photo is taken as aligned, any other is aligned FFHQ-style with dlib. The
face goes through pSp to W+, the style through the style encoder to z_s, once: the codes are kept per
browser session and the sliders re-run only the generator (fixed noise, as the release).
"""
import argparse
import atexit
import functools
import os
import shutil
import signal
import sys
import tempfile
import threading
import traceback
import uuid

import torch

from checkpoint import CheckpointError
from fileio import DiskFullError
from imageio_utils import UnreadableImageError
from inference import (DTYPES, Report, add_generator_args, check_model_files, default_device, encode_faces,
                       encode_styles, image_size, list_inputs, load_aligner, load_blendgan, load_psp, looks_aligned,
                       photo_problem, read_input, resize, truncation_centre, validate_common)
from op.precision import cpu_native_lowp
from utils import HelpFormatter, ten2img
from video import compose_frame, interpolation_alphas, sliding_window, write_mp4

ROOT = os.path.dirname(os.path.abspath(__file__))
FACES_DIR = os.path.join(ROOT, "test_imgs", "face_imgs")
STYLES_DIR = os.path.join(ROOT, "test_imgs", "style_imgs")
MAX_FILE_SIZE = "25mb"  # uploads above it are refused by the page
MAX_PIXELS = 50_000_000  # larger images are refused before they are decoded
DEFAULT_INDEX = 6  # the release GUI's indicator
TRUNCATION = 0.75  # the release GUI's random faces
CLIP_STEP, CLIP_TAIL, CLIP_FPS = 1.0, 5, 8  # gen_video's schedule at half the frames: 16 frames, 2 s
RANDOM = "random style (seed)"


class DemoError(Exception):
    """A user-facing problem, shown in the page as one line."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add_generator_args(p)
    p.add_argument("--psp_encoder_ckpt", default="pretrained_models/psp_encoder.pt", help="pSp encoder checkpoint")
    p.add_argument("--predictor", default=None, help="dlib 68-landmark model (default: face-recognition-models' file)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860, help="port to serve on")
    p.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    p.add_argument("--device", default=default_device(), help="torch device (default: cuda if present, else cpu)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="network precision (default: bfloat16 on a CPU with native bf16, 2x faster there; "
                        "else float32)")
    p.set_defaults(batch=1, theta=None)  # what validate_common checks besides device and dtype
    opts = p.parse_args(argv)
    opts.dtype = opts.dtype or ("bfloat16" if opts.device == "cpu" and cpu_native_lowp("bfloat16") else "float32")
    validate_common(p, opts)
    return opts


class BlendGANDemo:
    """The networks, loaded once, and every computation of the page (no Gradio here).

    A session is a dict: face = (kind, W code, thumbnail), kind 'photo' (pSp W+ [1, n_latent, 512]) or
    'random' (mapped w [1, 512], truncated when rendered); style = (z_s [1, style_dim], thumbnail).
    """

    def __init__(self, opts):
        self.opts = opts
        self.device, self.dtype = opts.device, DTYPES[opts.dtype]
        self.error = None
        self.g = self.psp = self.latent_avg = self._aligner = None
        self.lock = threading.Lock()  # one forward at a time, whatever the page's queue does
        self.tmpdir = tempfile.mkdtemp(prefix="blendgan_app_")
        atexit.register(shutil.rmtree, self.tmpdir, True)

    def load(self):
        """Load the networks; a missing or bad checkpoint is kept as self.error (the page shows it)."""
        opts = self.opts
        try:
            check_model_files(opts, psp=True)
            self.g, ckpt = load_blendgan(opts.ckpt, opts.size, opts.channel_multiplier, self.device, self.dtype)
            self.psp = load_psp(opts.psp_encoder_ckpt, self.g.size, self.device, self.dtype)
        except CheckpointError as e:
            self.error = str(e)
            return self
        # seeded: a random face of a given seed is the same face in every session and launch
        self.latent_avg = truncation_centre(self.g, ckpt, 4096, torch.Generator().manual_seed(0), self.device,
                                            self.dtype)
        return self

    @property
    def size(self):
        return self.g.size

    @property
    def n_latent(self):
        return self.g.n_latent if self.g is not None else 18

    def check_ready(self):
        if self.error:
            raise DemoError(self.error)

    def aligner(self):
        if self._aligner is None:
            try:
                self._aligner = load_aligner(True, self.opts.predictor)
            except FileNotFoundError as e:
                raise DemoError(f"face alignment is not available: {e}") from None
        return self._aligner

    def read_image(self, path, what, align=False):
        """RGB uint8 of an uploaded file; a face photo that is not square 256/512/1024 is aligned first."""
        if not path:
            raise DemoError(f"no {what} given")
        name = os.path.basename(path)
        try:
            w, h = image_size(path)
        except UnreadableImageError as e:
            if type(e.__cause__).__name__ == "DecompressionBombError":  # PIL refuses over 2 x 89 Mpx
                raise DemoError(f"{what} {name}: too large ({e.__cause__})") from None
            raise DemoError(f"{what} {name}: not an image file, or a damaged one (cannot decode it)") from None
        if w * h > MAX_PIXELS:
            raise DemoError(f"{what} {name}: {w}x{h} px is too large (at most {MAX_PIXELS // 1_000_000} Mpx); "
                            f"downscale it first")
        report = Report()
        aligner = self.aligner() if align and not looks_aligned(w, h) else None
        img = read_input(path, report, aligner, align_size=self.size)
        if img is None:
            raise DemoError(f"{what} {name}: {report.skipped[0][1]}")
        return img

    def face_from_photo(self, path):
        self.check_ready()
        problem = photo_problem(self.opts.ckpt, self.g.style_dim)
        if problem:
            raise DemoError(f"{problem}; random faces work with it")
        img = self.read_image(path, "face photo", align=True)
        with self.lock:
            code = encode_faces(self.psp, [img], 1, self.device, self.dtype)  # [1, n_latent, 512]
        return ("photo", code, resize(img, self.size))

    def style_from_image(self, path):
        self.check_ready()
        img = self.read_image(path, "style image")
        with self.lock:
            z = encode_styles(self.g, [img], 1, self.device, self.dtype)  # [1, style_dim]
        return (z, resize(img, self.size))

    def random_codes(self, seed):
        """(z_f, z_s): the first and second N(0, I) draws [1, style_dim] of a CPU generator seeded `seed`."""
        rng = torch.Generator().manual_seed(int(seed))
        z_f = torch.randn(1, self.g.style_dim, generator=rng)
        z_s = torch.randn(1, self.g.style_dim, generator=rng)
        return z_f.to(self.device, self.dtype), z_s.to(self.device, self.dtype)

    @torch.no_grad()
    def random_face(self, seed):
        self.check_ready()
        with self.lock:
            w = self.g.get_latent(self.random_codes(seed)[0])  # [1, 512]
        return ("random", w, None)  # no thumbnail: the page shows the natural render, made anyway

    def random_style(self, seed):
        self.check_ready()
        z_s = self.random_codes(seed)[1]
        return (z_s, None)

    @torch.no_grad()
    def forward(self, face, z_s, index, theta, truncation):
        """Generator output [1, 3, size, size] in [-1, 1]: face with style z_s (None: the natural face) at
        indicator index (None: every layer blended) and theta (1: the release's behaviour)."""
        kind, code, _ = face
        kw = dict(input_is_latent=True, randomize_noise=False)
        if kind == "random" and truncation < 1:
            kw.update(truncation=truncation, truncation_latent=self.latent_avg)
        if z_s is not None:
            kw.update(z_embed=z_s, add_weight_index=index,
                      theta=theta if index is not None and theta < 1 else None)
        with self.lock:
            return self.g([code], **kw)[0]

    def generate(self, face, z_s, index, theta, truncation):
        """As forward, as RGB uint8 [size, size, 3]."""
        return ten2img(self.forward(face, z_s, index, theta, truncation))[0]

    def render(self, session, index, theta, truncation, blended_only=False):
        """(full style, blended at index, natural face) uint8 images; None where an input is missing."""
        face, style = session.get("face"), session.get("style")
        if face is None:
            return None, None, None
        index = int(index)
        if style is None:
            return None, None, self.generate(face, None, None, None, truncation)
        blended = self.generate(face, style[0], index, theta, truncation)
        if blended_only:
            return None, blended, None
        return (self.generate(face, style[0], None, None, truncation), blended,
                self.generate(face, None, None, None, truncation))

    def clip(self, session, target, index, theta, truncation, progress=None):
        """An H.264 MP4 of the face walking from the session's style to `target` ((z_s, thumbnail)): the
        gen_video schedule and frame layout [face | sliding style window | result], fewer frames."""
        face, style = session.get("face"), session.get("style")
        if face is None or style is None:
            raise DemoError("choose a face and a style first: the clip starts from the current style")
        face_thumb = face[2] if face[2] is not None else self.generate(face, None, None, None, truncation)
        thumbs = [t if t is not None else self.generate(face, z, None, None, truncation)
                  for z, t in (style, target)]
        alphas = interpolation_alphas(step=CLIP_STEP, len_tail=CLIP_TAIL)
        frames, last_alpha, result = [], None, None
        for n, alpha in enumerate(alphas):
            if progress is not None:
                progress(n / len(alphas), desc="clip frames")
            if alpha != last_alpha:  # the held tail repeats its image
                z = torch.lerp(style[0], target[0], alpha)
                result = self.forward(face, z, index, theta, truncation)[0]
                last_alpha = alpha
            frames.append(compose_frame(face_thumb, sliding_window(thumbs[0], thumbs[1], alpha), result))
        path = os.path.join(self.tmpdir, f"clip_{session.setdefault('id', uuid.uuid4().hex)}.mp4")
        write_mp4(path, frames, fps=CLIP_FPS)
        return path


def user_errors(fn):
    """Every failure of a page callback as a readable message in the page, never a traceback."""
    import gradio as gr

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (DemoError, DiskFullError) as e:  # a full disk (the clip's mp4) says so, without a traceback
            raise gr.Error(str(e), duration=None, print_exception=False) from None
        except gr.Error:
            raise
        except Exception as e:  # a bug or an unexpected file: logged on the server, one line in the page
            traceback.print_exc()
            raise gr.Error(f"unexpected error: {type(e).__name__}: {e}", duration=None, print_exception=False) from None
    return wrapper


def build_demo(demo):
    """The page: a gradio.Blocks over a loaded (or failed) BlendGANDemo."""
    import gradio as gr

    face_paths, style_paths = list_inputs(FACES_DIR), list_inputs(STYLES_DIR)
    n = demo.n_latent

    def status_line(session):
        face, style = session.get("face"), session.get("style")
        if face is None or style is None:
            return f"Now choose a {'face' if face is None else 'style'}."
        return f"Face: {session['face_label']} · style: {session['style_label']}."

    def choose(session, kind, item, label, index, theta, truncation, progress):
        """Put a face or a style (``kind``) in the session and render; its preview is its thumbnail or, when
        drawn at random, the render that shows it (the natural face / the full style)."""
        session = {**session, kind: item, f"{kind}_label": label}
        progress(0.6, desc="generating")
        full, blended, natural = demo.render(session, index, theta, truncation)
        thumbnail = item[-1]  # face (kind, code, thumbnail), style (z_s, thumbnail)
        preview = thumbnail if thumbnail is not None else (natural if kind == "face" else full)
        return session, preview, full, blended, natural, status_line(session)

    def handlers(kind, encode, draw, paths, desc):
        """The upload, gallery-pick and random-draw callbacks of ``kind`` ('face' or 'style')."""

        @user_errors
        def upload(path, session, index, theta, truncation, progress=gr.Progress()):
            progress(0.1, desc=desc)
            return choose(session, kind, encode(path), os.path.basename(path), index, theta, truncation, progress)

        @user_errors
        def pick(session, index, theta, truncation, evt: gr.SelectData, progress=gr.Progress()):
            return upload(paths[evt.index], session, index, theta, truncation, progress)

        @user_errors
        def draw_random(seed, session, index, theta, truncation, progress=gr.Progress()):
            label = f"random (seed {int(seed)})"
            return (*choose(session, kind, draw(seed), label, index, theta, truncation, progress), seed + 1)

        return upload, pick, draw_random

    face_handlers = handlers("face", demo.face_from_photo, demo.random_face, face_paths,
                             "aligning and encoding the face (pSp)")
    style_handlers = handlers("style", demo.style_from_image, demo.random_style, style_paths, "encoding the style")

    def input_column(kind, upload_label, preview_label, paths):
        """Upload, preview, random button and gallery of the bundled images of one input (ids kind-*)."""
        with gr.Column():
            file = gr.File(label=upload_label, type="filepath", elem_id=f"{kind}-upload")
            preview = gr.Image(label=preview_label, interactive=False, height=256, elem_id=f"{kind}-preview")
            button = gr.Button(f"Random {kind}", elem_id=f"random-{kind}")
            gallery = gr.Gallery(paths, label=f"Bundled {kind}s (click one)", columns=8, height=140,
                                 allow_preview=False, elem_id=f"{kind}-gallery")
        return file, preview, button, gallery

    @user_errors
    def rerender(session, index, theta, truncation):
        demo.check_ready()
        return demo.render(session, index, theta, truncation)

    @user_errors
    def reblend(session, index, theta, truncation):
        demo.check_ready()
        return demo.render(session, index, theta, truncation, blended_only=True)[1]

    @user_errors
    def make_clip(session, target, seed, index, theta, truncation, progress=gr.Progress()):
        demo.check_ready()
        progress(0.0, desc="encoding the second style")
        if target == RANDOM:
            style = demo.random_style(seed)
        else:
            style = demo.style_from_image(os.path.join(STYLES_DIR, target))
        return demo.clip(session, style, index, theta, truncation, progress)

    with gr.Blocks(title="BlendGAN demo", analytics_enabled=False, delete_cache=(600, 3600)) as page:
        gr.Markdown("# BlendGAN: arbitrary stylized face generation\n"
                    "Choose a face and a style (upload, click a bundled one, or draw a random one), then move "
                    "the indicator *i*: 0 = style on every layer, "
                    f"{n} = the natural face. Non-aligned face photos are aligned with dlib first.")
        gr.Markdown(f"**⚠ {demo.error}**" if demo.error else "", visible=bool(demo.error), elem_id="startup-error")
        session = gr.State({})
        with gr.Row():
            face_column = input_column("face", "Face photo (upload)", "Face (aligned)", face_paths)
            style_column = input_column("style", "Style image (upload)", "Style", style_paths)
        with gr.Row():
            index = gr.Slider(0, n, value=min(DEFAULT_INDEX, n), step=1, label=f"indicator i (0 full style … {n} natural)",
                              elem_id="indicator")
            theta = gr.Slider(0, 1, value=1, step=0.05, label="theta: style weight of layer i (paper Eq. 5)",
                              elem_id="theta")
            truncation = gr.Slider(0, 1, value=TRUNCATION, step=0.05, label="truncation (random faces)",
                                   elem_id="truncation")
            seed = gr.Number(0, precision=0, label="seed (random face / style)", elem_id="seed")
        status = gr.Markdown("Now choose a face.", elem_id="status")
        with gr.Row():
            image_args = dict(format="png", interactive=False, height=360, buttons=["download", "fullscreen"])
            full = gr.Image(label="full style (i = 0: every layer blended)", elem_id="out-full", **image_args)
            blended = gr.Image(label="blended at i (PNG download: full resolution)", elem_id="out-blended", **image_args)
            natural = gr.Image(label="natural face", elem_id="out-natural", **image_args)
        with gr.Row():
            clip_target = gr.Dropdown([RANDOM] + [os.path.basename(p) for p in style_paths], value=RANDOM,
                                      label="interpolation clip: from the current style to", elem_id="clip-target")
            clip_btn = gr.Button("Make clip", elem_id="make-clip")
        clip_video = gr.Video(label="style interpolation (H.264)", autoplay=True, loop=True, elem_id="clip")

        sliders = [index, theta, truncation]
        run = dict(concurrency_id="generator")
        for kind, (file, preview, button, gallery), (upload, pick, draw) in (
                ("face", face_column, face_handlers), ("style", style_column, style_handlers)):
            outputs = [session, preview, full, blended, natural, status]
            file.upload(upload, [file, session, *sliders], outputs, api_name=f"set_{kind}", **run)
            gallery.select(pick, [session, *sliders], outputs, api_visibility="private", **run)
            button.click(draw, [seed, session, *sliders], outputs + [seed], api_name=f"random_{kind}", **run)
        for slider in (index, theta):  # moving them re-renders only the blended image
            slider.change(reblend, [session, *sliders], blended, api_name=f"blend_{slider.elem_id}",
                          show_progress="minimal", **run)
        truncation.change(rerender, [session, *sliders], [full, blended, natural], api_name="render", **run)
        clip_btn.click(make_clip, [session, clip_target, seed, *sliders], clip_video, api_name="clip", **run)
    return page


def launch(page, opts, **kwargs):
    """Serve the page: queued (one generator run at a time), uploads capped at MAX_FILE_SIZE."""
    page.queue(default_concurrency_limit=1, max_size=64)
    return page.launch(server_name=opts.host, server_port=opts.port, share=opts.share, max_file_size=MAX_FILE_SIZE,
                       allowed_paths=[FACES_DIR, STYLES_DIR], **kwargs)


def main(argv=None):
    opts = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    # `kill`, `docker stop`, a service manager: stop as on Ctrl-C, so that atexit removes the clips folder
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    demo = BlendGANDemo(opts).load()
    if demo.error:
        print(f"error: {demo.error}\n(the page starts anyway and shows this message)", file=sys.stderr)
    try:
        launch(build_demo(demo), opts)
    except OSError as e:  # the port is taken, or the address is not this machine's
        raise SystemExit(f"error: cannot serve on {opts.host}:{opts.port} ({e}); pick another --port or --host")
    return 0


if __name__ == "__main__":
    sys.exit(main())
