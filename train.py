"""Train BlendGAN (paper Sec. 3.2-3.4, A.1) or fine-tune it on one style image (A.5).

    python train.py FFHQ_LMDB AAHQ_LMDB --out_dir runs/blendgan --style_encoder_ckpt style_encoder.pt \
        --stylegan2_ckpt pretrained_models/stylegan2-ffhq-config-f.pt --size 1024 --batch 8 --iter 200000
    torchrun --nproc_per_node=4 train.py FFHQ_LMDB AAHQ_LMDB --batch 2 ...   (one process per GPU; the
        paper's global batch 8 = 4 x 2)
    python train.py FFHQ_LMDB --finetune_style_img ref.jpg --blendgan_ckpt blendgan.pt --out_dir runs/ft

Writes DIR/checkpoints/NNNNNN.pt, DIR/samples/NNNNNN.png, DIR/logs/ (TensorBoard + scalars.jsonl) and
DIR/config.json. The losses and phases are in blendgan_training.py.
"""
import argparse
import sys

import distributed
import trainutil
from blendgan_training import EQ8_READINGS, TrainOptions, resolve_defaults, train, validate
from utils import HelpFormatter


def build_parser():
    d = TrainOptions(ffhq_lmdb="")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("ffhq_lmdb", help="LMDB of natural faces (FFHQ), from prepare_data.py")
    p.add_argument("aahq_lmdb", nargs="?", default=None,
                   help="LMDB of artistic faces (AAHQ); not used with --finetune_style_img")
    p.add_argument("--out_dir", default=d.out_dir, help="run folder: checkpoints/, samples/, logs/, config.json")
    g = p.add_argument_group("initialisation")
    g.add_argument("--style_encoder_ckpt", default=None,
                   help="frozen style encoder E_style: a dict with a 'style_encoder' (or 'embedder') state dict, "
                        "a BlendGAN checkpoint whose g_ema holds embedder.*, or a bare StyleEncoder state dict")
    g.add_argument("--stylegan2_ckpt", default=None,
                   help="rosinality-format FFHQ StyleGAN2 checkpoint (g, d, g_ema): initialises G, g_ema and D_face")
    g.add_argument("--from_scratch", action="store_true",
                   help="start G, g_ema and D_face from random weights on purpose (the paper starts them from "
                        "--stylegan2_ckpt)")
    g.add_argument("--blendgan_ckpt", default=None,
                   help="start from a BlendGAN checkpoint (its g_ema is enough, e.g. the release's blendgan.pt); "
                        "required by --finetune_style_img")
    g.add_argument("--vgg_ckpt", default=None,
                   help="ImageNet VGG-19 weights, only needed when the style-encoder file lacks them")
    g.add_argument("--resume", default=None,
                   help="a checkpoint of this trainer to continue exactly, or 'latest' (newest in --out_dir)")
    g.add_argument("--finetune_style_img", nargs="+", default=None, metavar="IMG",
                   help="one-shot fine-tuning (A.5) on these reference style image(s): D_style and D_style_latent "
                        "see only them; batch 1 and 1000 iterations by default")
    a = p.add_argument_group("architecture")
    a.add_argument("--size", type=int, default=d.size, help="image size")
    a.add_argument("--style_dim", type=int, default=d.style_dim, help="width of the codes z_f, z_s and W")
    a.add_argument("--n_mlp", type=int, default=d.n_mlp, help="layers of each mapping MLP")
    a.add_argument("--channel_multiplier", type=int, default=d.channel_multiplier, help="StyleGAN2 width factor")
    a.add_argument("--style_pool_size", type=int, default=d.style_pool_size,
                   help="the style encoder's input pooling (the release uses 256; smaller only for quick tests)")
    t = p.add_argument_group("training")
    t.add_argument("--batch", type=int, default=None,
                   help="batch size PER GPU/process, as rosinality's trainer (default 8; 1 when fine-tuning); the "
                        "paper's global batch is 8, i.e. --batch 2 on 4 GPUs")
    t.add_argument("--iter", type=int, default=None, help="total iterations (default 200000; 1000 when fine-tuning)")
    t.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (before the lazy-reg correction)")
    t.add_argument("--queue_size", type=int, default=d.queue_size,
                   help="style codes kept for D_style_latent's negatives z_s^- (Eq. 8)")
    t.add_argument("--r1", type=float, default=d.r1, help="R1 weight on all three discriminators")
    t.add_argument("--d_reg_every", type=int, default=d.d_reg_every, help="lazy R1 interval")
    t.add_argument("--path_regularize", type=float, default=d.path_regularize, help="path-length weight")
    t.add_argument("--path_batch_shrink", type=int, default=d.path_batch_shrink,
                   help="the path-length batch is batch // this")
    t.add_argument("--g_reg_every", type=int, default=d.g_reg_every, help="lazy path-length interval")
    t.add_argument("--mixing", type=float, default=d.mixing, help="style-mixing probability of the face code")
    t.add_argument("--eq8", choices=EQ8_READINGS, default=d.eq8,
                   help="D_style_latent's fake pair (one stylized pass either way): 'conditional' = "
                        "(G(z_f, z_s^-), z_s^-), a projection-cGAN pair, that image also being Eq. 7's fake: G is "
                        "rewarded for following its style code; 'paper' = Eq. 7's image G(z_f, z_s) with a queue "
                        "code z_s^- as the negative, as printed (G's term then does not depend on z_s; README). "
                        "Default: the checkpoint's reading when resuming, else 'conditional'")
    t.add_argument("--ema_kimg", type=float, default=None,
                   help="half-life of g_ema (what checkpoints and the inference scripts use) in thousands of "
                        "images. Default: 10 when training (rosinality's 0.5 ** (32 / 10000) at 32 images per "
                        "step); when fine-tuning a tenth of the run's images (100 images for 1000 x 1), so that "
                        "g_ema keeps < 0.1%% of the starting weights")
    t.add_argument("--no_flip", dest="flip", action="store_false", help="no random horizontal flips of real images")
    t.add_argument("--seed", type=int, default=d.seed, help="random seed (each rank derives its own streams)")
    t.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present); one GPU per process")
    t.add_argument("--amp", action="store_true",
                   help="mixed precision for the adversarial phases: bfloat16 (CPU, and GPUs that support it), "
                        "else float16 with loss scaling (overflowing steps skipped); R1 and path length stay "
                        "float32")
    t.add_argument("--nonfinite_patience", type=int, default=d.nonfinite_patience,
                   help="a NaN/inf loss skips that step; the run stops after this many consecutive ones (or at "
                        "once when the weights are non-finite), keeping the last good checkpoint")
    t.add_argument("--num_workers", type=int, default=d.num_workers, help="data-loading processes per rank")
    o = p.add_argument_group("output")
    o.add_argument("--save_every", type=int, default=d.save_every, help="checkpoint interval (iterations)")
    o.add_argument("--keep_checkpoints", "--keep", type=int, default=d.keep_checkpoints,
                   help="checkpoints kept (the newest); --keep is the other trainers' name for it")
    o.add_argument("--sample_every", type=int, default=d.sample_every, help="sample-grid interval (iterations)")
    o.add_argument("--n_sample", type=int, default=d.n_sample, help="rows of the sample grid")
    o.add_argument("--log_every", type=int, default=d.log_every, help="scalar-logging interval (iterations)")
    o.add_argument("--no_progress", dest="progress", action="store_false", help="no tqdm progress bar")
    return p


def parse_args(argv=None):
    parser = build_parser()
    return trainutil.validated(parser, TrainOptions(**vars(parser.parse_args(argv))),
                               lambda opts: validate(resolve_defaults(opts)))


def main(argv=None):
    return trainutil.run_trainer(train, parse_args(argv),
                                 lambda s: distributed.is_main() and f"done at step {s.iteration}: {s.last_checkpoint}")


if __name__ == "__main__":
    sys.exit(main())
