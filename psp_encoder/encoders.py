"""pSp's GradualStyleEncoder on an IR-SE-50 backbone (Richardson et al., CVPR 2021, section 3).

The face image (256x256) goes through a 50-layer ResNet-IR with squeeze-and-excitation units; feature
maps tapped at three depths (c1 64x64, c2 32x32, c3 16x16) form a small feature pyramid, and one
GradualStyleBlock per W+ entry maps a pyramid level to a 512-d style: coarse styles from c3, middle
styles from p2 (c3 upsampled + c2), fine styles from p1 (p2 upsampled + c1).

Module and parameter names follow the released ``psp_encoder.pt`` key for key (see
shared/reference/official_checkpoint_format.md, section 5), so the file loads in strict mode.
"""
import math

import torch
from torch import nn
from torch.nn import functional as F

from model import EqualLinear
from op.precision import Conv2d

# IR-SE-50 stages as (output channels, number of units); the first unit of every stage has stride 2.
IR_SE_50_STAGES = ((64, 3), (128, 4), (256, 14), (512, 3))
STEM_CHANNELS = 64
SE_REDUCTION = 16
STYLE_DIM = 512

# Feature taps: the output of the last unit of stages 1, 2 and 3 (units 6, 20 and 23).
_STAGE_ENDS = tuple(sum(n for _, n in IR_SE_50_STAGES[:i + 1]) - 1 for i in range(len(IR_SE_50_STAGES)))
C1_UNIT = _STAGE_ENDS[1]  # 128 ch, 64x64 for a 256x256 input
C2_UNIT = _STAGE_ENDS[2]  # 256 ch, 32x32
C3_UNIT = _STAGE_ENDS[3]  # 512 ch, 16x16

# Style heads: [0, COARSE_IND) read c3, [COARSE_IND, MIDDLE_IND) read p2, [MIDDLE_IND, n_styles) read p1.
COARSE_IND = 3
MIDDLE_IND = 7
# Spatial size of the pyramid level each group of heads reads (for a 256x256 input).
COARSE_SPATIAL = 16
MIDDLE_SPATIAL = 32
FINE_SPATIAL = 64

HEAD_LEAKY_SLOPE = 0.01  # nn.LeakyReLU's default, as in the release


class SEModule(nn.Module):
    """Squeeze-and-excitation gate: x * sigmoid(fc2(relu(fc1(mean over H, W of x))))."""

    def __init__(self, channels, reduction=SE_REDUCTION):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = Conv2d(channels, channels // reduction, kernel_size=1, bias=False)
        self.relu = nn.ReLU()
        self.fc2 = Conv2d(channels // reduction, channels, kernel_size=1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):  # x [N, C, H, W]
        gate = self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))  # [N, C, 1, 1]
        return x * gate


class BottleneckIRSE(nn.Module):
    """One IR-SE unit: shortcut(x) + SE(BN(conv3x3_s(PReLU(conv3x3(BN(x)))))).

    The stride sits on the second 3x3 conv. The shortcut is a 1x1 max-pool with that stride (a plain
    subsampling, no weights) when the channel count is kept, else a strided 1x1 conv + BN.
    """

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        if in_channels == out_channels:
            self.shortcut_layer = nn.MaxPool2d(kernel_size=1, stride=stride)
        else:
            self.shortcut_layer = nn.Sequential(
                Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False),
            nn.PReLU(out_channels),
            Conv2d(out_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            SEModule(out_channels),
        )

    def forward(self, x):  # x [N, in, H, W] -> [N, out, H/stride, W/stride]
        return self.res_layer(x) + self.shortcut_layer(x)


class GradualStyleBlock(nn.Module):
    """Map a [N, C, spatial, spatial] pyramid level to one [N, 512] style.

    log2(spatial) stride-2 3x3 convs, each followed by LeakyReLU(0.01), bring the map to 1x1;
    an EqualLinear (lr_mul 1, no activation) follows.
    """

    def __init__(self, in_channels, out_channels, spatial):
        super().__init__()
        num_convs = int(math.log2(spatial))
        if 2 ** num_convs != spatial:
            raise ValueError(f"GradualStyleBlock: spatial size must be a power of two, got {spatial}")
        self.out_channels = out_channels
        layers = []
        for i in range(num_convs):
            layers.append(Conv2d(in_channels if i == 0 else out_channels, out_channels,
                                    kernel_size=3, stride=2, padding=1))
            layers.append(nn.LeakyReLU(HEAD_LEAKY_SLOPE))
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(out_channels, out_channels, lr_mul=1)

    def forward(self, x):  # x [N, C, spatial, spatial]
        x = self.convs(x)  # [N, out, 1, 1]
        return self.linear(x.reshape(-1, self.out_channels))  # [N, out]


def ir_se50_trunk():
    """The IR-SE-50 stem and its 24 units, shared by pSp's encoder and ArcFace (identity loss).

    Returns (input_layer, body, output channels); the modules are named ``input_layer`` and ``body`` by
    both owners, which fixes the ``input_layer.*`` / ``body.N.*`` keys of their checkpoints.
    """
    input_layer = nn.Sequential(
        Conv2d(3, STEM_CHANNELS, kernel_size=3, stride=1, padding=1, bias=False),
        nn.BatchNorm2d(STEM_CHANNELS),
        nn.PReLU(STEM_CHANNELS),
    )
    units = []
    in_channels = STEM_CHANNELS
    for out_channels, num_units in IR_SE_50_STAGES:
        for i in range(num_units):
            units.append(BottleneckIRSE(in_channels, out_channels, stride=2 if i == 0 else 1))
            in_channels = out_channels
    return input_layer, nn.Sequential(*units), in_channels


def upsample_add(x, y):
    """Bilinear (align_corners=True) resize of x to y's spatial size, plus y."""
    return F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=True) + y


class GradualStyleEncoder(nn.Module):
    """pSp encoder: [N, 3, 256, 256] image -> [N, n_styles, 512] W+ offsets (before latent_avg).

    Only the configuration of the release is implemented: num_layers=50, mode='ir_se'.
    n_styles = 2*log2(output_size) - 2 (18 at 1024 px, 10 at 64 px); it must exceed MIDDLE_IND so that
    every pyramid level has at least one head (output sizes >= 32).
    """

    def __init__(self, num_layers=50, mode="ir_se", n_styles=18):
        super().__init__()
        if num_layers != 50 or mode != "ir_se":
            raise ValueError(f"GradualStyleEncoder: only num_layers=50, mode='ir_se' (the release) is "
                             f"implemented, got num_layers={num_layers}, mode={mode!r}")
        if n_styles <= MIDDLE_IND:
            raise ValueError(f"GradualStyleEncoder: n_styles must be > {MIDDLE_IND} (output size >= 32), "
                             f"got {n_styles}")
        self.n_styles = n_styles
        self.input_layer, self.body, _ = ir_se50_trunk()
        c3_channels = IR_SE_50_STAGES[3][0]
        self.styles = nn.ModuleList(
            GradualStyleBlock(c3_channels, STYLE_DIM, self._head_spatial(i)) for i in range(n_styles))
        self.latlayer1 = Conv2d(IR_SE_50_STAGES[2][0], c3_channels, kernel_size=1)  # c2 -> 512 ch
        self.latlayer2 = Conv2d(IR_SE_50_STAGES[1][0], c3_channels, kernel_size=1)  # c1 -> 512 ch

    @staticmethod
    def _head_spatial(index):
        if index < COARSE_IND:
            return COARSE_SPATIAL
        if index < MIDDLE_IND:
            return MIDDLE_SPATIAL
        return FINE_SPATIAL

    def forward(self, x):  # x [N, 3, 256, 256]
        x = self.input_layer(x)  # [N, 64, 256, 256]
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i == C1_UNIT:
                c1 = x  # [N, 128, 64, 64]
            elif i == C2_UNIT:
                c2 = x  # [N, 256, 32, 32]
            elif i == C3_UNIT:
                c3 = x  # [N, 512, 16, 16]
        styles = [self.styles[i](c3) for i in range(COARSE_IND)]
        p2 = upsample_add(c3, self.latlayer1(c2))  # [N, 512, 32, 32]
        styles += [self.styles[i](p2) for i in range(COARSE_IND, MIDDLE_IND)]
        p1 = upsample_add(p2, self.latlayer2(c1))  # [N, 512, 64, 64]
        styles += [self.styles[i](p1) for i in range(MIDDLE_IND, self.n_styles)]
        return torch.stack(styles, dim=1)  # [N, n_styles, 512]
