"""The modified VGG16 of the paper and its pre-trained initialisation."""

from .pretrained import LoadReport, check_pretrained, load_pretrained
from .vgg import PRESETS, UDATVGG, VGGConfig, build_model

__all__ = ["UDATVGG", "VGGConfig", "PRESETS", "build_model", "load_pretrained", "check_pretrained",
           "LoadReport"]
