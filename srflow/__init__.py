"""SRFlow super-resolution (Lugmayr et al., ECCV 2020) on flowkernels, compatible with the official
checkpoints.

    model = srflow.SRFlow.from_preset("df2k-4x")                  # or SRFlow.from_official(path, "df2k-4x")
    nll = model.nll(hr, lr)                                      # (B,) bits per HR pixel
    zs = model.encode(hr, lr); sr = model.decode(lr, zs)         # exact round trip
    sr = model.sample(lr, temperature=0.9, seed=0)

``import srflow`` loads the model only (torch and flowkernels). See :mod:`srflow.model` for units,
the paper-vs-code choices and the sampling remedy; training is :mod:`srflow.train` (``train``)
with its options in :mod:`srflow.config` (``TrainConfig``), inference :mod:`srflow.infer`, and the
``srflow`` command line :mod:`srflow.cli`. Importing runs nothing.
"""

from flowkernels import __version__  # one distribution ships flowkernels and srflow

from .flow import FlowUpsamplerNet
from .model import QUANT, Conditioning, NonFiniteSampleWarning, SRFlow, dequantization_noise, dequantize
from .official_checkpoint import CheckpointError
from .presets import PRESETS, SRFlowPreset, get_preset
from .rrdb import RRDBNet

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
    "__version__",
    "dequantization_noise",
    "dequantize",
    "get_preset",
]
