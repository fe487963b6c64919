"""pSp encoder (GradualStyleEncoder, IR-SE-50) that maps a face image to a W+ code.

Use ``from psp_encoder.psp_encoders import PSPEncoder``; the network is in ``psp_encoder.encoders``.
"""
