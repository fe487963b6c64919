"""The release's module name for the style encoder, so that ``from model_encoder import StyleEncoder,
Projector`` in code written against it keeps working. The code lives in style_encoder.py (there,
gram_matrix returns the flattened [N, C*C] matrix)."""
from layers import EqualLinear
from style_encoder import FeatureOutput, Projector, StyleEncoder

__all__ = ["StyleEncoder", "Projector", "EqualLinear", "FeatureOutput"]
