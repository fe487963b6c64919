"""ArcFace IR-SE-50 (TreB1eN's face recognition network), the identity network of pSp's identity loss.

Its stem and 24 IR-SE units are the pSp encoder's (psp_encoder.encoders), so the key names are those of
pSp's ``model_ir_se50.pth``. psp_training.py uses it for the identity loss; model_zoo.py checks the file's
layout against it.
"""
import torch
from torch import nn
from torch.nn import functional as F

from checkpoint import load_checkpoint, load_state_dict_strict, with_batchnorm_counters
from psp_encoder.encoders import IR_SE_50_STAGES, ir_se50_trunk

ID_INPUT_SIZE = 112
ID_EMBEDDING_DIM = 512
ID_DROPOUT = 0.6  # the face-recognition training value; inactive in eval mode


class ArcFaceIRSE50(nn.Module):
    """ArcFace face-recognition network (IR-SE-50) of pSp's identity loss: [N, 3, 112, 112] -> [N, 512], unit norm.

    The stem and the 24 IR-SE units are the encoder's (psp_encoder.encoders), so the key names are those of
    model_ir_se50.pth: ``input_layer.*``, ``body.*`` and ``output_layer.{0,3,4}.*`` (BatchNorm2d, then
    Dropout and flatten, Linear(512*7*7 -> 512), BatchNorm1d).
    """

    def __init__(self):
        super().__init__()
        self.input_layer, self.body, in_channels = ir_se50_trunk()
        spatial = ID_INPUT_SIZE // 2 ** len(IR_SE_50_STAGES)  # 7
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Dropout(ID_DROPOUT),
            nn.Flatten(),
            nn.Linear(in_channels * spatial * spatial, ID_EMBEDDING_DIM),
            nn.BatchNorm1d(ID_EMBEDDING_DIM),
        )

    def forward(self, x):  # x [N, 3, 112, 112]
        x = self.body(self.input_layer(x))  # [N, 512, 7, 7]
        return F.normalize(self.output_layer(x), dim=1)  # [N, 512]


def load_arcface(path):
    """ArcFaceIRSE50 with the weights of ``path`` (strict), in eval mode and frozen."""
    ckpt = load_checkpoint(path, hint="pSp's model_ir_se50.pth (ArcFace IR-SE-50)")
    with torch.device("meta"):
        net = ArcFaceIRSE50()
    load_state_dict_strict(net, with_batchnorm_counters(net, ckpt), f"--id_weights {path}", assign=True)
    return net.eval().requires_grad_(False)
