"""Train the style encoder E_style self-supervised (SimCLR, NT-Xent) on an LMDB of artistic images.

    python train_style_encoder.py LMDB --out_dir runs/style_encoder            # one GPU (or the CPU)
    torchrun --nproc_per_node=4 train_style_encoder.py LMDB --out_dir DIR      # 4 GPUs, DDP
    python train_style_encoder.py LMDB --out_dir DIR --resume latest           # continue exactly

Writes DIR/checkpoints/NNNNNN.pt (complete: weights, optimizer, step, data position, RNG states,
options; the last --keep kept), DIR/logs/ (TensorBoard + scalars.jsonl), DIR/config.json and, at the
end, DIR/style_encoder.pt. Both kinds of file hold ``style_encoder``: the state dict that
``Generator(...).embedder`` loads unchanged (train.py --style_encoder_ckpt). See
style_encoder_training.py for the method (paper Sec. 3.1, A.1).
"""
import argparse
import sys

import trainutil
from style_encoder_training import AMP_DTYPES, TrainOptions, train, validate
from utils import HelpFormatter


def _pair(text):
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers, got {text!r}")
    return lo, hi


def parse_args(argv=None):
    d = TrainOptions(lmdb=[], out_dir="")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("lmdb", nargs="+", metavar="LMDB", help="LMDB(s) made by prepare_data.py (artistic images)")
    p.add_argument("--out_dir", required=True, help="run folder: checkpoints/, logs/, config.json")
    p.add_argument("--size", type=int, default=d.size, help="LMDB resolution to read; also the size of the views")
    p.add_argument("--batch", type=int, default=d.batch,
                   help="images per process (GPU); the global batch, over which NT-Xent runs, is batch x number "
                        "of processes (A.1: 256 = 4 GPUs x 64)")
    p.add_argument("--iter", type=int, default=d.iter, help="total iterations (A.1: 500k)")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (A.1)")
    p.add_argument("--beta1", type=float, default=d.beta1, help="Adam beta1 (A.1)")
    p.add_argument("--beta2", type=float, default=d.beta2, help="Adam beta2 (A.1)")
    p.add_argument("--temperature", type=float, default=d.temperature, help="NT-Xent temperature tau (Eq. 2)")
    p.add_argument("--style_dim", type=int, default=d.style_dim, help="size of z_s (512 in the release)")
    p.add_argument("--proj_layers", type=int, default=d.proj_layers,
                   help="layers of the projection head: 4 is the release's Projector default, the paper "
                        "describes 2; the head is dropped after training either way")
    p.add_argument("--style_pool_size", type=int, default=d.style_pool_size,
                   help="E_style's input pooling (256 in the release; smaller only for quick experiments)")
    p.add_argument("--vgg_ckpt", default=None,
                   help="local torchvision VGG-19 file (e.g. vgg19-dcbb9e9d.pth); default: torchvision's "
                        "IMAGENET1K_V1 weights from the torch hub cache or a download")
    p.add_argument("--crop_scale", type=_pair, default=d.crop_scale, help="area range of the random crop, MIN,MAX")
    p.add_argument("--crop_ratio", type=_pair, default=d.crop_ratio, help="aspect range of the random crop")
    p.add_argument("--rotate", type=float, default=d.rotate, help="max rotation of a view, degrees")
    p.add_argument("--shear", type=float, default=d.shear, help="max shear of a view, degrees")
    p.add_argument("--flip", type=float, default=d.flip, help="probability of a horizontal flip")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the weights, the data order and the views")
    p.add_argument("--amp", choices=sorted(AMP_DTYPES), default=d.amp,
                   help="autocast dtype for the frozen VGG-19; Gram products and the MLPs stay float32")
    p.add_argument("--channels_last", choices=("auto", "on", "off"), default=d.channels_last,
                   help="channels-last memory format for VGG-19 (auto: on for CUDA)")
    trainutil.add_run_args(p, d)
    return trainutil.validated(p, TrainOptions(**vars(p.parse_args(argv))), validate)


def main(argv=None):
    return trainutil.run_trainer(train, parse_args(argv),
                                 lambda r: r.export and f"done at step {r.step}: {r.checkpoint}, weights in {r.export}")


if __name__ == "__main__":
    sys.exit(main())
