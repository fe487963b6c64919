"""Get the external weight files, checked: python download_models.py [NAME ...] [--all] [--list] [--verify].

With no name it fetches what inference needs (blendgan.pt, psp_encoder.pt) into pretrained_models/.
Every file is verified (published SHA-256 where there is one, and its structure: keys and shapes) before
it is moved into place; its SHA-256 is printed. Interrupted downloads resume. Exit code 0: every file
verified; 2: a source could not be reached (one line per file says how to get it by hand); 1: otherwise.

    python download_models.py                  # blendgan.pt and psp_encoder.pt
    python download_models.py --all            # also the training / evaluation files
    python download_models.py --list           # every known file, where it comes from, present or not
    python download_models.py --verify         # check the files already there, download nothing
    python download_models.py --mirror https://example.org/blendgan-weights/ blendgan.pt
"""
import argparse
import os
import sys

import model_zoo
from utils import HelpFormatter


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("names", nargs="*", metavar="NAME",
                   help=f"files to get (default: {' '.join(model_zoo.INFERENCE_FILES)}); --list shows them all")
    p.add_argument("--all", action="store_true", help="every known file (inference, training, evaluation)")
    p.add_argument("--dir", default="pretrained_models",
                   help="folder for the BlendGAN / StyleGAN2 / pSp files (torchvision's and pytorch-fid's go to "
                        "the torch hub cache, where those libraries look)")
    p.add_argument("--mirror", default=os.environ.get(model_zoo.MIRROR_ENV) or None,
                   help=f"URL prefix that replaces every source: files are fetched from PREFIX/NAME "
                        f"(default: ${model_zoo.MIRROR_ENV})")
    p.add_argument("--list", action="store_true", help="list every known file and whether it is present and verified")
    p.add_argument("--verify", action="store_true", help="check the files already there (default: all known), download nothing")
    p.add_argument("--retries", type=int, default=3, help="times a cut connection is resumed within one run")
    opts = p.parse_args(argv)
    if opts.list and (opts.verify or opts.names or opts.all):
        p.error("--list takes no file names and no --verify/--all")
    if opts.retries < 0:
        p.error("--retries must be >= 0")
    return opts


def main(argv=None, manifest=model_zoo.MANIFEST):
    opts = parse_args(argv)
    if opts.list:
        return model_zoo.list_files(manifest, opts.dir, opts.mirror)
    names = opts.names or ([e.name for e in manifest] if opts.verify else None)
    try:
        entries = model_zoo.select(names, manifest, opts.all)
    except KeyError as e:
        raise SystemExit(f"error: {e.args[0]}")
    if opts.verify:
        return model_zoo.verify_all(entries, opts.dir, explicit=bool(opts.names))
    return model_zoo.download_all(entries, opts.dir, opts.mirror, opts.retries)


if __name__ == "__main__":
    sys.exit(main())
