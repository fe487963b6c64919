"""The evaluation protocol of the paper's Table 1 (evaluate.py): codes, rows, the resume cache, the tables.

LPIPS style diversity as StarGAN v2: per face code, n_styles style codes (latent-guided: random;
reference-guided: reference images) -> n_styles outputs; the metrics (metrics.py) see the outputs as the
inference scripts save them (8-bit). FID is taken against the statistics of the real artistic set (AAHQ),
cached in a pytorch-fid-style .npz; finished rows are kept in OUTDIR/partial_results.json so that an
interrupted run resumes. Nothing happens at import.
"""
import csv
import functools
import io
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from fileio import atomic_write_bytes
from imageio_utils import UnreadableImageError, list_images, read_image_rgb
from inference import encode_styles
from metrics import FeatureStats, frechet_distance, load_inception, load_lpips, lpips_diversity, style_consistency
from model_zoo import ALEXNET_URL, INCEPTION_URL, pretrained_file, sha256_of
from prepare_data import resize_and_center_crop

MODES = ("latent", "reference")
METRICS = ("fid", "lpips", "style_consistency")


# ----------------------------------------------------------------------------------------------------------
# The metrics' networks and FID statistics files


def load_metric_networks(inception=None, lpips_alexnet=None, allow_download=True):
    """(FID Inception features, LPIPS model) of metrics.py, on CPU in eval mode.

    Each weights file is the path given (--inception, --lpips_alexnet), else the torch hub cache, else a
    download when allowed (model_zoo.pretrained_file: a missing file raises a CheckpointError saying where
    to put it). Each network carries ``weights_file`` (its path) and ``weights_id`` ('sha256:<digest>').
    """
    extractor = load_inception(pretrained_file("FID Inception-v3", INCEPTION_URL, inception, "--inception",
                                               allow_download))
    lpips_model = load_lpips(pretrained_file("LPIPS AlexNet backbone", ALEXNET_URL, lpips_alexnet, "--lpips_alexnet",
                                             allow_download))
    for features in (extractor, lpips_model):
        # What the FID statistics cache and the settings record: the weights' content, so that a copy
        # elsewhere (a job's local scratch) is the same network and other weights are not (hashing
        # ~100-250 MB takes a fraction of a second; pSp training, which loads LPIPS too, does not need it).
        features.weights_id = f"sha256:{sha256_of(features.weights_file)}"
    return extractor, lpips_model


def save_stats(path, mu, sigma, n, source, features=""):
    """FID statistics as .npz (keys mu, sigma as pytorch-fid's --save-stats, plus n, source and features: the
    Inception weights, 'sha256:<digest>'), atomically."""
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma, n=np.int64(n), source=np.str_(source), features=np.str_(features))
    atomic_write_bytes(path, buf.getvalue())


def load_stats(path):
    """(mu, sigma, n, source, features) of a stats .npz; n = -1, source = features = '' for files from other
    tools."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if "mu" not in f or "sigma" not in f:
                raise ValueError(f"{path}: no 'mu'/'sigma' arrays (has {sorted(f.keys())})")
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
            n = int(f["n"]) if "n" in f else -1
            source = str(f["source"]) if "source" in f else ""
            features = str(f["features"]) if "features" in f else ""
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"FID statistics {path}: not readable ({e})") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"FID statistics {path}: mu {mu.shape} and sigma {sigma.shape} do not fit")
    return mu, sigma, n, source, features


# ----------------------------------------------------------------------------------------------------------
# Image sets: an LMDB of prepare_data.py or a folder


def is_lmdb(path):
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "data.mdb"))


def image_set_id(path, resolution):
    """How ImageSet(path, resolution) reads its images, for the records that decide whether numbers may be
    reused (statistics caches, a resumed evaluation): an LMDB at a resolution, or a folder brought to it."""
    how = "" if is_lmdb(path) else " (folder: shorter side scaled, centre square)"
    return f"{os.path.abspath(path)}@{resolution}{how}"


class ImageSet(Dataset):
    """RGB images of an LMDB (prepare_data.py layout, one ``resolution``) or of a folder (recursive).

    A folder's images are brought to ``resolution`` as prepare_data.py packs them (shorter side scaled to it,
    centre square; None: as stored), so that a folder and an LMDB made from it give the same images, and
    the same FID. Items are (uint8 [H, W, 3] or None, None or the reason it could not be read).
    """

    def __init__(self, path, resolution=None):
        self.path = path
        self.resolution = resolution
        self.lmdb = None
        self.files = None
        if is_lmdb(path):
            from dataset import MultiResolutionDataset

            if resolution is None:
                raise ValueError(f"{path} is an LMDB: say which of its resolutions to read")
            self.lmdb = MultiResolutionDataset(path, None, resolution)
        elif os.path.isdir(path) or os.path.isfile(path):
            self.files = list_images(path)
        else:
            raise FileNotFoundError(f"no such LMDB, folder or image: {path}")
        if len(self) == 0:
            raise ValueError(f"{path}: no images found")

    def __len__(self):
        return len(self.lmdb) if self.lmdb is not None else len(self.files)

    def name(self, index):
        return self.files[index] if self.files is not None else f"{self.path}[{index}]"

    def read(self, index):
        """uint8 RGB [H, W, 3]; raises UnreadableImageError naming the image."""
        if self.files is not None:
            img = read_image_rgb(self.files[index])
            return np.array(resize_and_center_crop(img, self.resolution) if self.resolution else img)
        try:
            return np.array(self.lmdb.read_image(index))
        except (OSError, ValueError, SyntaxError, KeyError) as e:
            raise UnreadableImageError(f"{self.name(index)}: cannot decode image ({e})") from None

    def __getitem__(self, index):
        try:
            return self.read(index), None
        except UnreadableImageError as e:
            return None, str(e)


def collate_rgb(items):
    """(list of uint8 [H, W, 3], list of errors)."""
    return [img for img, err in items if err is None], [err for _, err in items if err is not None]


def collate_resized(items, size):
    """([B, 3, size, size] in [0, 1] or None, list of errors): each image resized as the FID network does.

    Resizing a single image is the same as resizing it in a batch, and a 299 -> 299 bilinear resize is the
    identity, so images of any size give the features pytorch-fid would give them one by one.
    """
    images, errors = collate_rgb(items)
    xs = [F.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255, size=(size, size),
                        mode="bilinear", align_corners=False) for img in images]
    return (torch.cat(xs) if xs else None), errors


@torch.no_grad()
def dataset_statistics(images, extractor, batch, device, workers=0, desc="real images"):
    """FID statistics (mu, sigma, n, skipped) of an ImageSet (or a Subset of one); unreadable images skipped."""
    loader = DataLoader(images, batch_size=batch, num_workers=workers,
                        collate_fn=functools.partial(collate_resized, size=extractor.input_size))
    stats, skipped = FeatureStats(), []
    for x, errors in tqdm(loader, desc=desc, unit="batch"):
        for err in errors:
            print(f"skipped {err}", file=sys.stderr)
        skipped += errors
        if x is not None:
            stats.update(extractor(x.to(device)))
    mu, sigma = stats.mean_cov()
    return mu, sigma, stats.n, skipped


def real_statistics(real, resolution, n_real, stats_path, extractor, batch, device, workers=0):
    """FID statistics of the real artistic set, from the cache file ``stats_path`` or computed and cached.

    real: LMDB/folder (None: the cache must exist). n_real: first n images (None: all).
    Returns (mu, sigma, identity) where identity describes the set (it is part of the evaluation settings).
    """
    source = None
    if real is not None:
        source = image_set_id(real, resolution) + (f"[:{n_real}]" if n_real else "")
    if stats_path and os.path.isfile(stats_path):
        mu, sigma, n, cached_source, cached_features = load_stats(stats_path)
        if source is not None and cached_source and cached_source != source:
            raise ValueError(f"{stats_path} holds the statistics of {cached_source}, not of {source}; delete it "
                             f"or pass another --real_stats")
        # files of the previous format name the weights by their path
        if cached_features and cached_features not in (extractor.weights_id, extractor.weights_file):
            raise ValueError(f"{stats_path} holds statistics of the Inception weights {cached_features}, not of "
                             f"{extractor.weights_file} ({extractor.weights_id}); delete it or pass another "
                             f"--real_stats")
        print(f"FID statistics of the real set: {stats_path} ({n if n >= 0 else 'unknown number of'} images)")
        return mu, sigma, {"real": cached_source or os.path.abspath(stats_path), "n_real": n}
    if real is None:
        raise ValueError(f"no real set: pass --real (an LMDB or folder of artistic faces) or an existing --real_stats "
                         f"file ({stats_path} does not exist)")
    images = ImageSet(real, resolution)
    if n_real:
        if n_real > len(images):
            raise ValueError(f"--n_real {n_real}: {real} has only {len(images)} images")
        images = Subset(images, range(n_real))
    mu, sigma, n, skipped = dataset_statistics(images, extractor, batch, device, workers)
    if stats_path:
        save_stats(stats_path, mu, sigma, n, source, extractor.weights_id)
    print(f"FID statistics of {n} real images" + (f" ({len(skipped)} unreadable, skipped)" if skipped else "")
          + (f" cached in {stats_path}" if stats_path else ""))
    return mu, sigma, {"real": source, "n_real": n}



# ----------------------------------------------------------------------------------------------------------
# The Table 1 protocol


@dataclass
class Protocol:
    """What one evaluation row computes (see evaluate.py --help)."""

    n_samples: int = 50000  # generated images for FID (the first ones, face-major)
    lpips_faces: int = 1000  # face codes for LPIPS diversity and style consistency
    n_styles: int = 10  # style codes / references per face code
    lpips_size: int = 256  # side the outputs are resized to for LPIPS (0: as generated)
    truncation: float = 1.0
    theta: float = None
    seed: int = 0

    def n_faces(self):
        return max(math.ceil(self.n_samples / self.n_styles), self.lpips_faces)


def draw_codes(n_faces, n_styles, dim, seed):
    """Face codes z_f [F, dim] and random style codes z_s [F, S, dim], drawn on the CPU.

    One draw per face from two generators (seeds 2 seed and 2 seed + 1): face k gets the same codes
    whatever the batch size, the number of faces, or the rows computed before.
    """
    face_rng = torch.Generator().manual_seed(2 * seed)
    style_rng = torch.Generator().manual_seed(2 * seed + 1)
    z_face = torch.stack([torch.randn(dim, generator=face_rng) for _ in range(n_faces)])
    z_style = torch.stack([torch.randn(n_styles, dim, generator=style_rng) for _ in range(n_faces)])
    return z_face, z_style


def draw_references(n_faces, n_styles, n_refs, seed):
    """[F, S] indices of distinct references per face (seed 2 seed + 1, one draw per face)."""
    if n_refs < n_styles:
        raise ValueError(f"reference-guided rows need at least --n_styles {n_styles} reference images, "
                         f"the set has {n_refs}")
    rng = torch.Generator().manual_seed(2 * seed + 1)
    weights = torch.ones(n_refs)
    return torch.stack([torch.multinomial(weights, n_styles, replacement=False, generator=rng)
                        for _ in range(n_faces)])


def as_list(items):
    """A DataLoader's collate_fn that keeps the items as they are."""
    return items


@torch.no_grad()
def encode_references(g, refs, indices, codes, batch, device, dtype, workers=0):
    """Adds to ``codes`` {index: style code [style_dim] (CPU, float32)} the codes of the references ``indices``
    that decode; returns the indices that do not, each named on stderr."""
    loader = DataLoader(Subset(refs, indices), batch_size=batch, num_workers=workers, collate_fn=as_list)
    bad, start = [], 0
    for items in tqdm(loader, desc="reference style codes", unit="batch"):
        batch_indices, start = indices[start:start + len(items)], start + len(items)
        good = []
        for i, (img, err) in zip(batch_indices, items):
            if err is None:
                good.append((i, img))
            else:
                print(f"skipped {err}", file=sys.stderr)
                bad.append(i)
        if good:
            z = encode_styles(g, [img for _, img in good], batch, device, dtype).float().cpu()  # [B, style_dim]
            codes.update(zip([i for i, _ in good], z))
    return bad


def reference_codes(g, refs, n_faces, n_styles, seed, batch, device, dtype, workers=0):
    """Style codes [F, S, style_dim] (CPU, float32) of draw_references' references; each image encoded once.

    A reference that does not decode is named and left out of the set, and the references are drawn again
    from the rest with the same seed (only the images not encoded before are read), as the real set's
    statistics skip it: so the references are the same whichever run finds the bad file.
    """
    usable = torch.arange(len(refs))
    codes = {}
    while True:
        picks = usable[draw_references(n_faces, n_styles, len(usable), seed)]  # [F, S] indices into refs
        todo = [i for i in torch.unique(picks).tolist() if i not in codes]
        bad = encode_references(g, refs, todo, codes, batch, device, dtype, workers)
        if not bad:
            return torch.stack([codes[i] for i in picks.flatten().tolist()]).view(*picks.shape, -1)
        usable = usable[~torch.isin(usable, torch.tensor(bad))]


def quantize(images):
    """Generator output [N, 3, H, W] in [-1, 1] -> the 8-bit values the inference scripts save (float 0..255).

    The release's conversion (utils.ten2img): (x * 0.5 + 0.5) * 255, clamped, truncated.
    """
    return ((images.float() * 0.5 + 0.5) * 255).clamp(0, 255).floor()


@torch.no_grad()
def evaluate_row(g, indicator, z_face, z_style, protocol, real_mu, real_sigma, extractor, lpips_model,
                 batch, truncation_latent=None, desc=None):
    """One Table 1 row: FID, LPIPS diversity and style consistency of G(z_f, z_s, i) at indicator i.

    z_face [F, D] and z_style [F, S, D] (CPU): the codes of the faces in order; face k's S outputs are
    images k*S ... k*S + S - 1. FID takes the first n_samples images against (real_mu, real_sigma);
    LPIPS and style consistency the first lpips_faces faces. Metrics see the outputs as the inference
    scripts save them (8-bit). Returns a dict of floats (NaN for a metric with no samples).
    """
    p = next(g.parameters())
    device, dtype = p.device, p.dtype
    n_faces, n_styles, dim = z_style.shape
    faces_per_step = max(1, batch // n_styles)
    kw = dict(truncation=protocol.truncation, truncation_latent=truncation_latent, randomize_noise=False,
              add_weight_index=indicator, theta=protocol.theta)
    fid_stats, lpips_sum, cos_sum, cos_n = FeatureStats(), 0.0, 0.0, 0
    for start in tqdm(range(0, n_faces, faces_per_step), desc=desc, unit="step"):
        stop = min(start + faces_per_step, n_faces)
        zf = z_face[start:stop].repeat_interleave(n_styles, 0).to(device=device, dtype=dtype)  # [F*S, D]
        zs = z_style[start:stop].reshape(-1, dim).to(device=device, dtype=dtype)  # [F*S, D]
        q = quantize(g([zf], z_embed=zs, **kw)[0])  # [F*S, 3, H, W], 0..255
        n_fid = min(len(q), protocol.n_samples - start * n_styles)
        if n_fid > 0:
            fid_stats.update(extractor(q[:n_fid] / 255))
        n_div = min(stop, protocol.lpips_faces) - start
        if n_div > 0:
            x = (q[:n_div * n_styles] / 255 - 0.5) / 0.5  # [-1, 1], as utils.img2ten reads a saved image
            cos = style_consistency(g, x, zs[:n_div * n_styles])
            cos_sum += cos.double().sum().item()
            cos_n += len(cos)
            if protocol.lpips_size and protocol.lpips_size != x.shape[-1]:
                x = F.interpolate(x, size=(protocol.lpips_size, protocol.lpips_size), mode="bilinear",
                                  align_corners=False, antialias=True)
            lpips_sum += lpips_diversity(lpips_model, x.view(n_div, n_styles, *x.shape[1:])).double().sum().item()
    fid = float("nan")
    if fid_stats.n >= 2:
        mu, sigma = fid_stats.mean_cov()
        fid = frechet_distance(mu, sigma, real_mu, real_sigma)
    n_div_faces = min(n_faces, protocol.lpips_faces)
    return {"fid": fid, "lpips": lpips_sum / n_div_faces if n_div_faces else float("nan"),
            "style_consistency": cos_sum / cos_n if cos_n else float("nan"),
            "n_fid": fid_stats.n, "lpips_faces": n_div_faces}


def parse_indicators(text):
    """'0,2,4' or '0,2,...,18' (an arithmetic progression, step from the first two) -> list of ints."""
    tokens = [t.strip() for t in text.split(",") if t.strip()]
    out = []
    for k, t in enumerate(tokens):
        if t == "...":
            if len(out) < 2 or k + 1 >= len(tokens):
                raise ValueError(f"'...' in '{text}' needs two values before it and one after")
            step, end = out[-1] - out[-2], int(tokens[k + 1])
            if step <= 0 or (end - out[-1]) % step:
                raise ValueError(f"'{text}': {end} is not reached from {out[-2]},{out[-1]} in steps of {step}")
            out += list(range(out[-1] + step, end, step))
        else:
            out.append(int(t))
    if len(set(out)) != len(out):
        raise ValueError(f"'{text}': an indicator is repeated")
    return out


def row_key(mode, indicator):
    return f"{mode}/{indicator}"


def fmt(value, digits):
    return "–" if value is None or value != value else f"{value:.{digits}f}"


def write_tables(rows, modes, indicators, outdir):
    """table1.csv (one line per mode and indicator) and table1.md (Table 1 layout), atomically."""
    buf = io.StringIO()
    fields = ["mode", "indicator", *METRICS, "n_fid", "lpips_faces"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for mode in modes:
        for i in indicators:
            row = rows.get(row_key(mode, i))
            if row is not None:
                writer.writerow({"mode": mode, "indicator": i, **{k: row[k] for k in fields[2:]}})
    atomic_write_bytes(os.path.join(outdir, "table1.csv"), buf.getvalue().encode())

    names = {"latent": "latent-guided", "reference": "reference-guided"}
    head = ["i"] + [f"{names[m]} {h}" for m in modes for h in ("FID ↓", "LPIPS ↑", "style cos ↑")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i in indicators:
        cells = [str(i)]
        for mode in modes:
            row = rows.get(row_key(mode, i), {})
            cells += [fmt(row.get("fid"), 2), fmt(row.get("lpips"), 4), fmt(row.get("style_consistency"), 4)]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    atomic_write_bytes(os.path.join(outdir, "table1.md"), text.encode())
    return text


class PartialResults:
    """Finished rows kept in OUTDIR/partial_results.json (rewritten atomically after each row).

    The file records the settings that determine the numbers; a rerun with other settings is refused
    rather than mixing rows of different evaluations. ``previous``: {setting: the value an older version
    of this file recorded for the same thing} (the metric weights were named by path before their hash),
    accepted as equal; the file is rewritten with the current values at the next row.
    """

    def __init__(self, outdir, settings, previous=None):
        self.path = os.path.join(outdir, "partial_results.json")
        self.settings = json.loads(json.dumps(settings))  # as it reads back from the file
        self.rows = {}
        if os.path.isfile(self.path):
            with open(self.path) as f:
                data = json.load(f)
            previous = {k: v for k, v in (previous or {}).items() if v is not None}
            old = {k: self.settings.get(k) if k in previous and v == previous[k] else v
                   for k, v in data.get("settings", {}).items()}
            if old != self.settings:
                diff = [f"{k}: {old.get(k)!r} -> {self.settings.get(k)!r}" for k in sorted(set(old) | set(self.settings))
                        if old.get(k) != self.settings.get(k)]
                raise ValueError(f"{self.path} holds rows of an evaluation with other settings ({'; '.join(diff)}); "
                                 f"use another --outdir or delete the file")
            self.rows = data.get("rows", {})

    def add(self, key, row):
        self.rows[key] = row
        data = json.dumps({"settings": self.settings, "rows": self.rows}, indent=1, allow_nan=True)
        atomic_write_bytes(self.path, data.encode())


def run_protocol(g, modes, indicators, protocol, real_mu, real_sigma, extractor, lpips_model, outdir, settings,
                 batch, refs=None, truncation_latent=None, workers=0):
    """Every (mode, indicator) row not already in OUTDIR/partial_results.json; writes the tables after each row.

    Rows are computed whole, in batches that depend only on ``batch`` and the face index (not on which rows
    ran before), so rerun and resume with the same ``batch`` reproduce the numbers bit for bit (evaluate.py).

    refs: ImageSet of reference images (reference-guided rows). Returns the Markdown table.
    """
    os.makedirs(outdir, exist_ok=True)
    # results files written before the metric weights were identified by hash name them by path
    previous = {"inception": getattr(extractor, "weights_file", None),
                "lpips_alexnet": getattr(lpips_model, "weights_file", None)}
    partial = PartialResults(outdir, settings, previous)
    todo = [(m, i) for m in modes for i in indicators if row_key(m, i) not in partial.rows]
    for m, i in [(m, i) for m in modes for i in indicators if (m, i) not in todo]:
        print(f"{m}-guided i={i}: kept from {partial.path}")
    if todo:
        n_faces = protocol.n_faces()
        z_face, z_style = draw_codes(n_faces, protocol.n_styles, g.style_dim, protocol.seed)
        p = next(g.parameters())
        for mode in modes:
            if not any(m == mode for m, _ in todo):
                continue
            codes = z_style
            if mode == "reference":
                codes = reference_codes(g, refs, n_faces, protocol.n_styles, protocol.seed, batch, p.device, p.dtype,
                                        workers)
            for m, i in todo:
                if m != mode:
                    continue
                t0 = time.time()
                row = evaluate_row(g, i, z_face, codes, protocol, real_mu, real_sigma, extractor, lpips_model,
                                   batch, truncation_latent, desc=f"{mode}-guided i={i}")
                row["seconds"] = round(time.time() - t0, 1)
                partial.add(row_key(mode, i), row)
                write_tables(partial.rows, modes, indicators, outdir)
                print(f"{mode}-guided i={i}: FID {fmt(row['fid'], 2)}, LPIPS {fmt(row['lpips'], 4)}, "
                      f"style cos {fmt(row['style_consistency'], 4)}")
    return write_tables(partial.rows, modes, indicators, outdir)


def evaluation_settings(ckpt, size, real_identity, refs_identity, protocol, **extra):
    """What determines the numbers of a row (stored with the partial results): the checkpoint file, the real
    set, the references, the protocol and ``extra`` (dtype, metric weights files)."""
    st = os.stat(ckpt)
    return {"ckpt": os.path.abspath(ckpt), "ckpt_bytes": st.st_size, "ckpt_mtime_ns": st.st_mtime_ns, "size": size,
            **real_identity, "refs": refs_identity, **asdict(protocol), **extra}
