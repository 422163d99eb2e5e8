"""fastmae: Masked Autoencoders (He et al., 2021) for your own images."""

from ._version import __version__ as __version__
from .api import encode, load, require_decoder
from .figures.reconstruction import reconstruct
from .infer.api import predict
from .models.mae import MAE_VARIANTS, MaskedAutoencoderViT, build_mae
from .models.masking import random_masking
from .models.patches import patchify, unpatchify
from .models.pos_embed import resample_pos_embed, sincos_2d
from .models.vit import VARIANTS, VisionTransformer, build_vit

__all__ = [
    "MAE_VARIANTS",
    "VARIANTS",
    "MaskedAutoencoderViT",
    "VisionTransformer",
    "build_mae",
    "build_vit",
    "encode",
    "load",
    "patchify",
    "predict",
    "random_masking",
    "reconstruct",
    "require_decoder",
    "resample_pos_embed",
    "sincos_2d",
    "unpatchify",
]
