"""Train the pSp encoder (face photo -> W+) for a BlendGAN generator (paper A.3), so real photos can be stylized.

    python train_psp.py FFHQ_LMDB --ckpt runs/blendgan/checkpoints/NNNNNN.pt --out_dir runs/psp \\
        --id_weights pretrained_models/model_ir_se50.pth --encoder_backbone pretrained_models/model_ir_se50.pth
    torchrun --nproc_per_node=4 train_psp.py ...the same arguments...                # 4 GPUs, DDP
    python train_psp.py ...the same arguments... --resume latest                    # continue exactly

A missing LPIPS / ArcFace / backbone file stops the run before it starts, naming the file, its flag and the
flag that does without it (--lpips_weight 0, --id_weight 0, --encoder_from_scratch).

The generator (the checkpoint's g_ema) is frozen at indicator i = n_latent (natural faces); only the encoder
learns, with pSp's losses (L2, LPIPS, identity, W-norm). Writes DIR/checkpoints/NNNNNN.pt (loadable by
PSPEncoder as they are, plus the training state), DIR/logs/ (TensorBoard + scalars.jsonl), DIR/samples/
(input | reconstruction | stylized), DIR/config.json and, at the end, DIR/psp_encoder.pt in the release's
layout, for style_transfer_folder.py / gen_video.py --psp_encoder_ckpt. See psp_training.py.
"""
import argparse
import sys

import trainutil
from psp_training import AMP_DTYPES, PSPTrainOptions, train, validate
from utils import HelpFormatter


def parse_args(argv=None):
    d = PSPTrainOptions(lmdb=[], blendgan_ckpt="", out_dir="")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("lmdb", nargs="+", metavar="LMDB", help="LMDB(s) of FFHQ-aligned faces made by prepare_data.py")
    p.add_argument("--ckpt", dest="blendgan_ckpt", metavar="CKPT", required=True,
                   help="BlendGAN checkpoint (train.py or the release's blendgan.pt): its g_ema is the frozen "
                        "generator")
    p.add_argument("--out_dir", required=True, help="run folder: checkpoints/, logs/, samples/, config.json")
    p.add_argument("--size", type=int, default=d.size,
                   help="LMDB resolution read; the losses compare at it (default: min(generator size, 256), as pSp)")
    p.add_argument("--batch", type=int, default=d.batch, help="faces per process (GPU)")
    p.add_argument("--iter", type=int, default=d.iter, help="total iterations")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (pSp's value)")
    p.add_argument("--beta1", type=float, default=d.beta1, help="Adam beta1")
    p.add_argument("--beta2", type=float, default=d.beta2, help="Adam beta2")
    p.add_argument("--l2_weight", type=float, default=d.l2_weight, help="weight of the pixel-wise L2 loss")
    p.add_argument("--lpips_weight", type=float, default=d.lpips_weight,
                   help="weight of LPIPS (AlexNet, v0.1); needs --lpips_alexnet or the file in the torch hub cache "
                        "(0: no LPIPS)")
    p.add_argument("--id_weight", type=float, default=d.id_weight,
                   help="weight of the ArcFace identity loss; needs --id_weights (0: no identity loss)")
    p.add_argument("--w_norm_weight", type=float, default=d.w_norm_weight,
                   help="weight of the W-norm regulariser ||w - latent_avg||")
    p.add_argument("--lpips_alexnet", default=None,
                   help="torchvision AlexNet weights (alexnet-owt-7be5be79.pth); default: the torch hub cache "
                        "(nothing is downloaded; without the file the run stops unless --lpips_weight 0)")
    p.add_argument("--id_weights", default=None,
                   help="ArcFace IR-SE-50 weights (pSp's model_ir_se50.pth); required unless --id_weight 0")
    p.add_argument("--encoder_backbone", default=None,
                   help="IR-SE-50 weights to start the encoder's stem and body from (model_ir_se50.pth, or a pSp "
                        "checkpoint); required for a new run unless --encoder_from_scratch")
    p.add_argument("--encoder_from_scratch", action="store_true",
                   help="start the encoder from random weights on purpose (pSp starts from the IR-SE-50 backbone)")
    p.add_argument("--latent_avg_samples", type=int, default=d.latent_avg_samples,
                   help="face codes averaged for latent_avg (the generator's mean latent)")
    p.add_argument("--encoder_input_size", type=int, default=d.encoder_input_size,
                   help="size the encoder pools its input to; inference always uses 256, change only for tests")
    p.add_argument("--randomize_noise", action="store_true",
                   help="fresh noise maps per forward (pSp) instead of the stored ones that inference uses")
    p.add_argument("--flip", type=float, default=d.flip, help="probability of a horizontal flip of a face")
    p.add_argument("--sample_every", type=int, default=d.sample_every, help="iterations between sample grids")
    p.add_argument("--n_sample", type=int, default=d.n_sample, help="faces in a sample grid (0: no grids)")
    p.add_argument("--sample_style_img", default=None,
                   help="reference style image of the grid's stylized column (default: a fixed random style code)")
    p.add_argument("--sample_index", type=int, default=d.sample_index, help="indicator i of the stylized column")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the weights, latent_avg, data order and flips")
    p.add_argument("--amp", choices=sorted(AMP_DTYPES), default=d.amp,
                   help="autocast dtype for the encoder and the generator (fp16 with a gradient scaler on CUDA); "
                        "the losses stay float32")
    trainutil.add_run_args(p, d)
    return trainutil.validated(p, PSPTrainOptions(**vars(p.parse_args(argv))), validate)


def done_message(result):
    return result.export and (f"done at step {result.step}: {result.checkpoint}; encoder for inference in "
                              f"{result.export}")


def main(argv=None):
    # ValueError: what only the run can find out (LMDB resolution, generator size, no active loss)
    return trainutil.run_trainer(train, parse_args(argv), done_message, expected=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
