"""The release's module name for the style encoder, so that code written against it (``from model_encoder
import StyleEncoder, Projector, gram_matrix, ...``) keeps working. The code lives in style_encoder.py; the
classes here only add the release's constructors."""
from layers import EqualLinear, PixelNorm
from style_encoder import (FeatureOutput, GramEmbedder, Projector, StyleEncoder, VGGFeatureExtractor,
                           imagenet_vgg19_state_dict)
from style_encoder import gram_matrix as flat_gram_matrix

__all__ = ["StyleEncoder", "Projector", "EqualLinear", "FeatureOutput", "FeatureExtractor", "StyleEmbedder",
           "PixelNorm", "gram_matrix"]


def gram_matrix(y):
    """The release's shape: [N, C, H, W] -> [N, C, C], F F^T / (C*H*W) (style_encoder.gram_matrix flattens it
    to [N, C*C]; both compute in float32)."""
    c = y.shape[1]
    return flat_gram_matrix(y).view(-1, c, c)


class FeatureExtractor(VGGFeatureExtractor):
    """The release's constructor: VGG-19 up to relu5_4, ImageNet weights unless load_pretrained_vgg=False;
    forward gives FeatureOutput(relu1, ..., relu5)."""

    def __init__(self, load_pretrained_vgg=True):
        super().__init__()
        if load_pretrained_vgg:
            self.load_vgg(imagenet_vgg19_state_dict())


class StyleEmbedder(GramEmbedder):
    """The release's constructor: pool256 -> VGG-19 -> flattened Gram matrices [N, 610304], ImageNet VGG
    weights unless load_pretrained_vgg=False."""

    def __init__(self, load_pretrained_vgg=True):
        super().__init__()
        if load_pretrained_vgg:
            self.feature_extractor.load_vgg(imagenet_vgg19_state_dict())
