"""SRFlow super-resolution (Lugmayr et al., ECCV 2020) on flowkernels, compatible with the official
checkpoints.

    model = srflow.SRFlow.from_preset("df2k-4x")                  # or SRFlow.from_official(path, "df2k-4x")
    nll = model.nll(hr, lr)                                      # (B,) bits per HR pixel
    zs = model.encode(hr, lr); sr = model.decode(lr, zs)         # exact round trip
    sr = model.sample(lr, temperature=0.9, seed=0)

See :mod:`srflow.model` for units, the paper-vs-code choices and the sampling remedy,
:mod:`srflow.train` (``TrainConfig``, ``train``) for training and :mod:`srflow.cli` for the
``srflow`` command line. Importing runs nothing.
"""

from .official_checkpoint import CheckpointError
from .flow import FlowUpsamplerNet
from .model import QUANT, Conditioning, NonFiniteSampleWarning, SRFlow, dequantize
from .presets import PRESETS, SRFlowPreset, get_preset
from .rrdb import RRDBNet
from .train import TrainConfig, train

__all__ = [
    "PRESETS",
    "QUANT",
    "CheckpointError",
    "Conditioning",
    "FlowUpsamplerNet",
    "NonFiniteSampleWarning",
    "RRDBNet",
    "SRFlow",
    "SRFlowPreset",
    "TrainConfig",
    "dequantize",
    "get_preset",
    "train",
]
