"""Small reference models with normalization, pooling, head, dropout and drop-path switches, and timm models.

- :class:`MLP` and :class:`ResNet`: ``norm`` (batch / layer / weight / ic / none), ``head`` (linear /
  dropconnect), and for the ResNet ``pool`` (stride / max / fractional).
- :class:`SpeedNet`: a small CNN shaped for a compute budget (pool before BN, channels_last), the CPU speedrun's.
- :class:`TimmModel`: any timm architecture with pretrained weights (a local file or timm's download),
  a new head and any number of input channels (needs the ``timm`` extra, imported only when built).
"""

from lightning_tricks.models.cnn import ResNet
from lightning_tricks.models.mlp import MLP
from lightning_tricks.models.speed import SpeedNet
from lightning_tricks.models.timm_model import MissingExtraError, TimmModel

__all__ = ["MLP", "MissingExtraError", "ResNet", "SpeedNet", "TimmModel"]
