"""download_models.py / model_zoo.py against a local HTTP server (127.0.0.1, started here): downloads,
resume after a cut connection, refused files, HTML pages, --mirror, --verify, --list, offline.

The served checkpoints are built here from the project's modules at small size (Generator(32, 16, 2),
a pSp encoder for 32 px): every key, shape and dtype is the module's; tensors above a few thousand
elements are stride-0 views of one random number, so each file is a few hundred KB.
"""
import dataclasses
import hashlib
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import threading

import pytest
import torch

import download_models
import model_zoo
from model import Generator
from model_zoo import WeightFile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = os.environ.get("BLENDGAN_SCHEMA", os.path.join(ROOT, "..", "shared", "reference",
                                                        "official_checkpoint_schema.json"))
G_ARGS = dict(size=32, style_dim=16, n_mlp=2, channel_multiplier=1)
PSP_SIZE = 32


def tiny_tensors(meta_state_dict, seed):
    """Real tensors of the same keys, shapes and dtypes; large ones as stride-0 views (small files)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in meta_state_dict.items():
        if not v.is_floating_point():
            out[k] = torch.zeros(v.shape, dtype=v.dtype)
        elif v.numel() <= 4096:
            out[k] = torch.randn(v.shape, generator=gen)
        else:
            out[k] = torch.randn(1, generator=gen).expand(v.shape)
    return out


def saved_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def files():
    from psp_encoder.encoders import GradualStyleEncoder
    from psp_encoder.psp_encoders import n_styles_for

    with torch.device("meta"):
        g = Generator(G_ARGS["size"], G_ARGS["style_dim"], G_ARGS["n_mlp"],
                      channel_multiplier=G_ARGS["channel_multiplier"], load_pretrained_vgg=False).state_dict()
        enc = GradualStyleEncoder(50, "ir_se", n_styles_for(PSP_SIZE)).state_dict()
    blendgan = saved_bytes({"g_ema": tiny_tensors(g, 0), "latent_avg": torch.randn(1, G_ARGS["style_dim"])})
    psp = saved_bytes({**{f"encoder.{k}": v for k, v in tiny_tensors(enc, 1).items()}, "latent_avg": torch.randn(512)})
    html = (b"<!DOCTYPE html><html><head><title>Google Drive - Quota exceeded</title></head>"
            b"<body>Too many users have viewed or downloaded this file recently.</body></html>")
    return {"/blendgan.pt": blendgan, "/psp_encoder.pt": psp, "/quota.html": html}


class Server:
    """Serves ``files`` with Range support; ``cut[path] = n`` sends only n bytes of the next response
    for that path (the full Content-Length announced), then closes the connection."""

    def __init__(self, files):
        self.files, self.cut, self.requests = dict(files), {}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if start >= len(data):
                    self.send_error(416)
                    return
                self.send_response(206 if rng else 200)
                self.send_header("Content-Type", "text/html" if self.path.endswith(".html") else "application/octet-stream")
                self.send_header("Content-Length", str(len(data) - start))
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                body = data[start:]
                if self.path in server.cut:
                    body = body[:server.cut.pop(self.path)]
                    self.close_connection = True
                self.wfile.write(body)
                self.wfile.flush()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def server(files):
    s = Server(files)
    yield s
    s.httpd.shutdown()


@pytest.fixture
def fresh(server):
    server.requests.clear()
    server.cut.clear()
    return server


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there: connection refused


def manifest_for(base):
    return (WeightFile("blendgan.pt", "tests", (f"{base}/blendgan.pt",), "blendgan", dict(G_ARGS)),
            WeightFile("psp_encoder.pt", "tests", (f"{base}/psp_encoder.pt",), "psp", dict(output_size=PSP_SIZE)),
            WeightFile("extra.pt", "tests", (f"{base}/extra.pt",), "weights_dict"))


def lines_of(capsys):
    return [line for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_download_verifies_moves_into_place_and_prints_sha256(fresh, files, tmp_path, capsys):
    from psp_encoder.psp_encoders import PSPEncoder

    code = download_models.main(["--dir", str(tmp_path)], manifest=manifest_for(fresh.url))
    out = lines_of(capsys)
    assert code == 0 and len(out) == 2, out
    for name in ("blendgan.pt", "psp_encoder.pt"):
        data = (tmp_path / name).read_bytes()
        assert data == files["/" + name]
        line = next(line for line in out if line.startswith(name))
        assert "verified" in line and hashlib.sha256(data).hexdigest() in line
    assert sorted(os.listdir(tmp_path)) == ["blendgan.pt", "psp_encoder.pt"]  # no partial file left
    # what was verified is what the project's loader accepts
    assert PSPEncoder(str(tmp_path / "psp_encoder.pt"), output_size=PSP_SIZE).n_styles == 8
    # a second run finds them, verifies them and downloads nothing
    fresh.requests.clear()
    assert download_models.main(["--dir", str(tmp_path)], manifest=manifest_for(fresh.url)) == 0
    assert fresh.requests == [] and all("already at" in line for line in lines_of(capsys))


def test_cut_connection_is_resumed_to_the_same_bytes(fresh, files, tmp_path):
    entry = manifest_for(fresh.url)[0]
    data = files["/blendgan.pt"]
    half = len(data) // 2
    target = tmp_path / "blendgan.pt"
    part = tmp_path / ".blendgan.pt.part"
    # no retry in this run: the partial file is kept, the target is not written
    fresh.cut["/blendgan.pt"] = half
    outcome = model_zoo.fetch(entry, str(tmp_path), retries=0)
    assert outcome.status == "failed" and "run the command again to resume" in outcome.line
    assert not target.exists() and part.read_bytes() == data[:half]
    # the next run asks for the rest only and ends with the served bytes
    outcome = model_zoo.fetch(entry, str(tmp_path), retries=0)
    assert outcome.status == "verified", outcome.line
    assert fresh.requests[-1] == ("/blendgan.pt", f"bytes={half}-")
    assert target.read_bytes() == data and not part.exists()
    # within one run: cut, then resumed automatically
    target.unlink()
    fresh.requests.clear()
    fresh.cut["/blendgan.pt"] = 1000
    assert model_zoo.fetch(entry, str(tmp_path), retries=1).status == "verified"
    assert fresh.requests == [("/blendgan.pt", None), ("/blendgan.pt", "bytes=1000-")]
    assert target.read_bytes() == data


def test_checksum_mismatch_and_wrong_layout_are_refused_and_leave_nothing(fresh, files, tmp_path):
    blendgan, psp, _ = manifest_for(fresh.url)
    bad_hash = dataclasses.replace(blendgan, sha256="0" * 64)
    outcome = model_zoo.fetch(bad_hash, str(tmp_path))
    assert outcome.status == "refused" and "SHA-256" in outcome.line and "0" * 64 in outcome.line
    assert os.listdir(tmp_path) == []
    good_prefix = dataclasses.replace(blendgan, sha256_prefix=hashlib.sha256(files["/blendgan.pt"]).hexdigest()[:8])
    assert model_zoo.fetch(good_prefix, str(tmp_path)).status == "verified"
    (tmp_path / "blendgan.pt").unlink()
    # the pSp file where a generator is expected, and a generator of another size
    wrong = dataclasses.replace(blendgan, sources=(f"{fresh.url}/psp_encoder.pt",))
    outcome = model_zoo.fetch(wrong, str(tmp_path))
    assert outcome.status == "refused" and "wrong layout" in outcome.line and "g_ema" in outcome.line
    bigger = dataclasses.replace(blendgan, layout_args=dict(G_ARGS, size=64))
    outcome = model_zoo.fetch(bigger, str(tmp_path))
    assert outcome.status == "refused" and "wrong layout" in outcome.line and "missing" in outcome.line
    psp_wrong_size = dataclasses.replace(psp, layout_args=dict(output_size=64))
    assert model_zoo.fetch(psp_wrong_size, str(tmp_path)).status == "refused"
    assert os.listdir(tmp_path) == []  # neither a target nor a partial file


def test_html_page_is_reported_as_one_with_the_manual_fallback(fresh, tmp_path, capsys):
    quota = WeightFile("blendgan.pt", "tests", (f"{fresh.url}/quota.html",), "blendgan", dict(G_ARGS))
    code = download_models.main(["--dir", str(tmp_path)], manifest=(quota,))
    (line,) = lines_of(capsys)
    assert code == 1
    assert "HTML page" in line and "Quota exceeded" in line
    assert f"open {fresh.url}/quota.html in a browser and save the file as {tmp_path / 'blendgan.pt'}" in line
    assert os.listdir(tmp_path) == []
    # Drive sources get Drive's page address as the manual fallback
    assert model_zoo.browser_url("gdrive:abc") == "https://drive.google.com/file/d/abc/view"
    # a mirror that serves a bad file: the fallback is the publisher's page, not the mirror again
    mirrored = WeightFile("quota.html", "tests", ("gdrive:FILEID",), "blendgan", dict(G_ARGS))
    code = download_models.main(["--dir", str(tmp_path), "--mirror", fresh.url, "quota.html"], manifest=(mirrored,))
    assert code == 1
    (line,) = lines_of(capsys)
    assert "HTML page" in line and "open https://drive.google.com/file/d/FILEID/view in a browser" in line
    assert fresh.url not in line.split("Manual fallback")[-1]


def test_mirror_flag_and_environment_variable_rewrite_the_source(fresh, files, tmp_path, monkeypatch, capsys):
    fresh.files["/m/blendgan.pt"] = files["/blendgan.pt"]
    offline = manifest_for(closed_port_url())
    assert download_models.main(["--dir", str(tmp_path), "--mirror", f"{fresh.url}/m/", "blendgan.pt"],
                                manifest=offline) == 0
    assert fresh.requests == [("/m/blendgan.pt", None)]
    assert (tmp_path / "blendgan.pt").read_bytes() == files["/blendgan.pt"]
    (tmp_path / "blendgan.pt").unlink()
    fresh.requests.clear()
    monkeypatch.setenv(model_zoo.MIRROR_ENV, f"{fresh.url}/m")
    assert download_models.main(["--dir", str(tmp_path), "blendgan.pt"], manifest=offline) == 0
    assert fresh.requests == [("/m/blendgan.pt", None)]
    capsys.readouterr()
    download_models.main(["--list", "--dir", str(tmp_path)], manifest=offline)
    assert f"{fresh.url}/m/psp_encoder.pt" in capsys.readouterr().out


def test_verify_and_list_report_present_missing_and_bad(files, tmp_path, capsys):
    manifest = manifest_for(closed_port_url())
    (tmp_path / "blendgan.pt").write_bytes(files["/blendgan.pt"])
    (tmp_path / "psp_encoder.pt").write_bytes(files["/psp_encoder.pt"][:5000])  # truncated
    code = download_models.main(["--verify", "--dir", str(tmp_path)], manifest=manifest)
    out = lines_of(capsys)
    assert code == 1 and len(out) == 3, out
    assert out[0].startswith("verified blendgan.pt") and hashlib.sha256(files["/blendgan.pt"]).hexdigest() in out[0]
    assert out[1].startswith("BAD      psp_encoder.pt") and "truncated or corrupt" in out[1]
    assert out[2].startswith("missing  extra.pt") and "python download_models.py extra.pt" in out[2]
    assert download_models.main(["--verify", "--dir", str(tmp_path), "blendgan.pt"], manifest=manifest) == 0
    capsys.readouterr()
    assert download_models.main(["--verify", "--dir", str(tmp_path), "extra.pt"], manifest=manifest) == 1
    capsys.readouterr()
    assert download_models.main(["--list", "--dir", str(tmp_path)], manifest=manifest) == 0
    heads = [line for line in lines_of(capsys) if not line.startswith(" ")]
    assert heads[0] == "blendgan.pt: verified"
    assert heads[1].startswith("psp_encoder.pt: bad (") and heads[2] == "extra.pt: missing"
    # an HTML page saved under the weight's name (the known Drive failure) is bad, not verified
    (tmp_path / "blendgan.pt").write_bytes(files["/quota.html"])
    assert model_zoo.file_status(manifest[0], str(tmp_path))[0] == "bad"
    assert "HTML page" in model_zoo.file_status(manifest[0], str(tmp_path))[1]


def test_unknown_name_is_one_error_line(tmp_path):
    with pytest.raises(SystemExit) as e:
        download_models.main(["--dir", str(tmp_path), "nope.pt"], manifest=manifest_for(closed_port_url()))
    assert "unknown file(s): nope.pt" in str(e.value.code) and "blendgan.pt" in str(e.value.code)


def test_offline_one_line_per_file_and_exit_code_2(tmp_path, capsys):
    code = download_models.main(["--dir", str(tmp_path), "--all"], manifest=manifest_for(closed_port_url()))
    out = lines_of(capsys)
    assert code == 2 and len(out) == 3, out
    for line, name in zip(out, ("blendgan.pt", "psp_encoder.pt", "extra.pt")):
        assert line.startswith(f"{name}: cannot reach 127.0.0.1") and f"save it as {tmp_path / name}" in line
    assert os.listdir(tmp_path) == []


def test_offline_command_line_with_the_real_manifest(tmp_path):
    """The script itself (real manifest, sources replaced by a dead mirror): one stdout line per file, exit 2."""
    r = subprocess.run([sys.executable, "download_models.py", "--dir", str(tmp_path), "--mirror", closed_port_url()],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    out = r.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in out] == ["blendgan.pt", "psp_encoder.pt"]
    assert all("cannot reach" in line for line in out)


def test_manifest_sources_are_the_publishers():
    import pytorch_fid.inception
    from torchvision.models import AlexNet_Weights, VGG19_Weights

    from style_encoder import VGG19_WEIGHTS_FILE

    by_name = {e.name: e for e in model_zoo.MANIFEST}
    assert by_name["vgg19-dcbb9e9d.pth"].sources == (VGG19_Weights.IMAGENET1K_V1.url,)
    assert VGG19_WEIGHTS_FILE in by_name
    assert by_name["alexnet-owt-7be5be79.pth"].sources == (AlexNet_Weights.IMAGENET1K_V1.url, ) == (model_zoo.ALEXNET_URL,)
    assert by_name["pt_inception-2015-12-05-6726825d.pth"].sources == (pytorch_fid.inception.FID_WEIGHTS_URL,) \
        == (model_zoo.INCEPTION_URL,)
    for e in model_zoo.MANIFEST:
        if e.home == "hub":  # torch.hub's convention: the name ends with the hash prefix
            assert os.path.splitext(e.name)[0].endswith(e.sha256_prefix)
            assert model_zoo.target_path(e, "x") == model_zoo.hub_cache_path(e.sources[0])
        assert e.layout in model_zoo.LAYOUTS
    drive = {e.name: e.sources[0] for e in model_zoo.MANIFEST if e.sources[0].startswith(model_zoo.DRIVE_PREFIX)}
    assert drive["blendgan.pt"] == "gdrive:1eF04jKMLAb9DvzI72m8Akn5ykWf3EafE"
    assert drive["psp_encoder.pt"] == "gdrive:14nevG94hNkkwaoK5eJLF1iv78cv5O8fN"
    assert drive["style_encoder.pt"] == "gdrive:1EaM0ZYsAMdPkbRz0smLNIlJ1rxVAhbEz"


def schema_rows(name):
    if not os.path.isfile(SCHEMA):
        pytest.skip(f"schema not found at {SCHEMA}")
    with open(SCHEMA) as f:
        return [r for group in json.load(f)["modules"][name]["groups"].values() for r in group]


def test_expected_blendgan_and_psp_layouts_are_the_release_schema():
    by_name = {e.name: e for e in model_zoo.MANIFEST}
    g = model_zoo.generator_layout(**by_name["blendgan.pt"].layout_args)
    rows = schema_rows("Generator_1024")
    assert list(g) == [r[0] for r in rows]
    assert all(list(g[k].shape) == shape and str(g[k].dtype) == "torch." + dtype for k, shape, dtype, _ in rows)
    # a state dict with the schema's keys and shapes passes the blendgan.pt check; one key less does not
    sd = {k: torch.empty(shape, dtype=getattr(torch, dtype), device="meta") for k, shape, dtype, _ in rows}
    assert model_zoo.check_blendgan({"g_ema": sd}, **by_name["blendgan.pt"].layout_args) == ""
    sd.pop("add_weight")
    with pytest.raises(model_zoo.LayoutError, match="1 missing: add_weight"):
        model_zoo.check_blendgan({"g_ema": sd}, **by_name["blendgan.pt"].layout_args)
    psp = {k: torch.empty(shape, dtype=getattr(torch, dtype), device="meta")  # keys with "encoder."
           for k, shape, dtype, _ in schema_rows("PSPEncoder_1024_encoder")}
    assert model_zoo.check_psp({**psp, "latent_avg": torch.empty(18, 512)}, **by_name["psp_encoder.pt"].layout_args) == ""


def test_scripts_name_every_missing_file_in_one_line(tmp_path):
    import gen_video
    import generate_image_pairs
    import style_transfer_folder

    a, b = str(tmp_path / "a.pt"), str(tmp_path / "b.pt")
    for module in (style_transfer_folder, gen_video):
        with pytest.raises(SystemExit) as e:
            module.main(["--ckpt", a, "--psp_encoder_ckpt", b, "--device", "cpu", "--outdir", str(tmp_path / "o")])
        msg = str(e.value.code)
        assert "\n" not in msg and f"{a} (--ckpt)" in msg and f"{b} (--psp_encoder_ckpt)" in msg
        assert "python download_models.py blendgan.pt psp_encoder.pt" in msg
    with pytest.raises(SystemExit) as e:
        generate_image_pairs.main(["--ckpt", a, "--device", "cpu", "--outdir", str(tmp_path / "o")])
    assert "python download_models.py blendgan.pt" in str(e.value.code) and "psp" not in str(e.value.code)
    assert not (tmp_path / "o").exists()  # nothing started


def test_google_drive_files_go_through_gdown_and_the_same_checks(files, tmp_path, monkeypatch):
    """gdown (patched: no network here) gets the Drive id and a staging path; what it writes is verified
    like any download, its quota error and a dead route are reported as such."""
    import gdown
    import requests

    entry = WeightFile("blendgan.pt", "tests", ("gdrive:FILEID",), "blendgan", dict(G_ARGS))
    calls = []

    def fake_download(id, output, quiet, resume, served=files["/blendgan.pt"]):
        calls.append((id, output, resume))
        with open(output, "wb") as f:
            f.write(served)
        return output

    monkeypatch.setattr(gdown, "download", fake_download)
    outcome = model_zoo.fetch(entry, str(tmp_path))
    assert outcome.status == "verified" and calls[0][0] == "FILEID" and calls[0][2] is True
    assert os.path.dirname(calls[0][1]) == str(tmp_path) and calls[0][1] != str(tmp_path / "blendgan.pt")
    assert (tmp_path / "blendgan.pt").read_bytes() == files["/blendgan.pt"] and os.listdir(tmp_path) == ["blendgan.pt"]
    (tmp_path / "blendgan.pt").unlink()
    # Drive's quota page saved by the downloader: refused as HTML, nothing left
    monkeypatch.setattr(gdown, "download", lambda **kw: fake_download(**kw, served=files["/quota.html"]))
    outcome = model_zoo.fetch(entry, str(tmp_path))
    assert outcome.status == "refused" and "HTML page" in outcome.line
    assert "https://drive.google.com/file/d/FILEID/view in a browser" in outcome.line and os.listdir(tmp_path) == []

    def quota(**kw):
        raise gdown.exceptions.FileURLRetrievalError("Too many users have viewed or downloaded this file recently.")

    monkeypatch.setattr(gdown, "download", quota)
    outcome = model_zoo.fetch(entry, str(tmp_path))
    assert outcome.status == "refused" and "Too many users" in outcome.line and "in a browser" in outcome.line

    def offline(**kw):
        raise requests.exceptions.ConnectionError("Failed to resolve 'drive.google.com'")

    monkeypatch.setattr(gdown, "download", offline)
    outcome = model_zoo.fetch(entry, str(tmp_path))
    assert outcome.status == "unreachable" and outcome.line.startswith("blendgan.pt: cannot reach drive.google.com")
    assert os.listdir(tmp_path) == []


def test_right_keys_with_one_wrong_shape_or_latent_avg_are_refused_naming_the_key():
    """Same keys, same element count, one tensor transposed: refused, as is a latent_avg that does not
    broadcast to [n_styles, 512]."""
    import re

    expected = {"conv.weight": torch.empty(4, 6), "conv.bias": torch.empty(4)}
    model_zoo.compare_layout({"conv.weight": torch.zeros(4, 6), "conv.bias": torch.zeros(4)}, expected, "toy")
    message = "toy: 1 mis-shaped (file vs expected): conv.weight [6, 4] float32 vs [4, 6] float32"
    with pytest.raises(model_zoo.LayoutError, match=f"^{re.escape(message)}$"):
        model_zoo.compare_layout({"conv.weight": torch.zeros(6, 4), "conv.bias": torch.zeros(4)}, expected, "toy")

    g = model_zoo.generator_layout(**G_ARGS)
    name = next(k for k, v in g.items() if v.dim() == 4 and v.shape[0] != v.shape[1])
    flipped = {**g, name: g[name].transpose(0, 1)}
    assert flipped[name].numel() == g[name].numel() and flipped.keys() == g.keys()
    assert model_zoo.check_blendgan({"g_ema": g}, **G_ARGS) == ""
    with pytest.raises(model_zoo.LayoutError, match=rf"1 mis-shaped \(file vs expected\): {name} "):
        model_zoo.check_blendgan({"g_ema": flipped}, **G_ARGS)

    from psp_encoder.encoders import GradualStyleEncoder

    with torch.device("meta"):
        encoder = {f"encoder.{k}": v for k, v in GradualStyleEncoder(50, "ir_se", 8).state_dict().items()}
    for good in (torch.empty(512), torch.empty(8, 512), torch.empty(1, 8, 512), torch.empty(1, 512)):
        assert model_zoo.check_psp({**encoder, "latent_avg": good}, 32) == ""
    for bad in (torch.empty(512, 8), torch.empty(4, 512), torch.empty(8, 256), torch.empty(2, 8, 512)):
        with pytest.raises(model_zoo.LayoutError, match=f"'latent_avg' .*found {re.escape(str(list(bad.shape)))}"):
            model_zoo.check_psp({**encoder, "latent_avg": bad}, 32)


def test_a_download_onto_a_full_disk_keeps_only_its_part_file_and_resumes(fresh, files, small_disk, capsys):
    """psp_encoder.pt (950 KiB) after blendgan.pt (140 KiB) does not fit a 1 MiB disk: its part stays under the
    .part name (never as the file), the files after it are not tried, exit code 1; with room it resumes."""
    manifest = manifest_for(fresh.url)
    code = download_models.main(["--dir", str(small_disk), "blendgan.pt", "psp_encoder.pt", "extra.pt"],
                                manifest=manifest)
    out = lines_of(capsys)
    part = small_disk / ".psp_encoder.pt.part"
    assert code == 1 and len(out) == 3, out
    assert out[0].startswith("blendgan.pt: downloaded to ")
    assert out[1] == (f"psp_encoder.pt: cannot write {small_disk / 'psp_encoder.pt'}: the disk is full (0 MiB free "
                      f"in {small_disk}); the 1 MiB downloaded so far are kept in {part}: free some space and run the "
                      f"command again to resume")
    assert out[2] == "extra.pt: not downloaded, the disk is full"
    assert sorted(os.listdir(small_disk)) == [".psp_encoder.pt.part", "blendgan.pt"]
    have = part.read_bytes()
    assert 0 < len(have) < len(files["/psp_encoder.pt"]) and files["/psp_encoder.pt"].startswith(have)
    assert (small_disk / "blendgan.pt").read_bytes() == files["/blendgan.pt"]
    assert [path for path, _ in fresh.requests] == ["/blendgan.pt", "/psp_encoder.pt"]
    (small_disk / "blendgan.pt").unlink()  # room again
    assert download_models.main(["--dir", str(small_disk), "psp_encoder.pt"], manifest=manifest) == 0
    assert fresh.requests[-1] == ("/psp_encoder.pt", f"bytes={len(have)}-")
    assert (small_disk / "psp_encoder.pt").read_bytes() == files["/psp_encoder.pt"]
    assert os.listdir(small_disk) == ["psp_encoder.pt"]


@pytest.mark.parametrize("extra", [None, b"not a checkpoint"])
def test_after_a_full_disk_the_files_already_there_are_still_verified(extra, fresh, files, tmp_path, monkeypatch,
                                                                      capsys):
    """Verifying a file in place needs no room: only the files that are not there, or not right, are 'not
    downloaded' (a bad one is not a traceback)."""
    (tmp_path / "psp_encoder.pt").write_bytes(files["/psp_encoder.pt"])
    if extra is not None:
        (tmp_path / "extra.pt").write_bytes(extra)
    fetched = []

    def fetch(entry, *args):
        fetched.append(entry.name)
        return model_zoo.Outcome(entry.name, "disk full", f"{entry.name}: cannot write it, the disk is full")

    monkeypatch.setattr(model_zoo, "fetch", fetch)
    code = download_models.main(["--dir", str(tmp_path), "blendgan.pt", "psp_encoder.pt", "extra.pt"],
                                manifest=manifest_for(fresh.url))
    out = lines_of(capsys)
    assert code == 1 and fetched == ["blendgan.pt"] and len(out) == 3, out
    assert out[0] == "blendgan.pt: cannot write it, the disk is full"
    assert out[1].startswith(f"psp_encoder.pt: already at {tmp_path / 'psp_encoder.pt'}, verified (sha256 ")
    assert out[2] == "extra.pt: not downloaded, the disk is full"
