"""The RRDB encoder (ESRGAN's RRDBNet) and the conditioning features SRFlow reads from it.

Architecture (nf features, gc growth channels; keys as in the official state_dicts under ``RRDB.``):

* ``conv_first``: 3x3, 3 -> nf.
* ``RRDB_trunk.{i}``: nb blocks; each holds ``RDB1..RDB3`` (residual dense blocks with five 3x3
  convolutions ``conv1..conv5`` of widths nf -> gc, nf+gc -> gc, ..., nf+4gc -> nf, LeakyReLU(0.2)
  after the first four, output ``0.2 * x5 + x``) and returns ``0.2 * RDB3(RDB2(RDB1(x))) + x``.
* ``trunk_conv``: 3x3, nf -> nf; ``fea_up1 = fea + trunk_conv(fea)`` (the global residual).
* ``upconv1..upconv{log2(scale)}``: each after a nearest x2 upsampling and followed by a
  LeakyReLU(0.2): ``fea_up2 = lrelu(upconv1(up(fea_up1)))``, ``fea_up4 = lrelu(upconv2(up(fea_up2)))``,
  ... The features are taken *after* their LeakyReLU: the official RRDB builds it with
  ``inplace=True`` and writes ``fea = lrelu(fea_up2)``, which overwrites the stored ``fea_up2``
  (pinned by the official fixtures, ``tests/test_srflow_official.py``).
* ``HRconv``, ``conv_last``: ESRGAN's image head. Present in the state_dict; the flow never uses it
  (nor the last upconv), so :meth:`RRDBNet.features` does not compute them.

Conditioning of flow level l (DESIGN.md section 5): the feature at that level's resolution
(``fea_up{scale / 2^l}``, with ``fea_up0`` = bilinear 1/2 of ``fea_up1``, align_corners=False)
concatenated, feature first, with the outputs of the trunk blocks ``block_idxs`` (concatenated in
that order) resized to the same size by nearest interpolation (up: pixel repetition; down to
half: the even-indexed pixels). With the official settings: 64 + 4 * 64 = 320 channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ResidualDenseBlock", "RRDBBlock", "RRDBNet", "feature_name"]

_LRELU_SLOPE = 0.2
_RESIDUAL_SCALE = 0.2


def _lrelu(x: Tensor) -> Tensor:
    return F.leaky_relu(x, _LRELU_SLOPE)


def feature_name(factor: float) -> str:
    """Name of the RRDB feature at ``factor`` times the LR size: ``fea_up2``, ``fea_up1``, ``fea_up0`` (1/2)."""
    return "fea_up0" if factor == 0.5 else f"fea_up{int(factor)}"


class ResidualDenseBlock(nn.Module):
    """ESRGAN's ResidualDenseBlock_5C: five densely connected 3x3 convolutions, ``0.2 * x5 + x``.

    Weights: kaiming-normal (fan_in) scaled by 0.1, zero bias (ESRGAN's initialisation).
    """

    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(nf, gc, 3, 1, 1)
        self.conv2 = nn.Conv2d(nf + gc, gc, 3, 1, 1)
        self.conv3 = nn.Conv2d(nf + 2 * gc, gc, 3, 1, 1)
        self.conv4 = nn.Conv2d(nf + 3 * gc, gc, 3, 1, 1)
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, 1, 1)
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4, self.conv5):
            nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_in")
            with torch.no_grad():
                conv.weight.mul_(0.1)
                conv.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        x1 = _lrelu(self.conv1(x))
        x2 = _lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = _lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = _lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * _RESIDUAL_SCALE + x


class RRDBBlock(nn.Module):
    """Residual-in-residual dense block: ``0.2 * RDB3(RDB2(RDB1(x))) + x``."""

    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.RDB1 = ResidualDenseBlock(nf, gc)
        self.RDB2 = ResidualDenseBlock(nf, gc)
        self.RDB3 = ResidualDenseBlock(nf, gc)

    def forward(self, x: Tensor) -> Tensor:
        return self.RDB3(self.RDB2(self.RDB1(x))) * _RESIDUAL_SCALE + x


class RRDBNet(nn.Module):
    """ESRGAN's RRDBNet with SRFlow's feature taps.

    Args:
        nf: feature width; gc: growth channels; nb: trunk blocks; scale: 4 or 8 (one upconv per
        factor 2); block_idxs: trunk indices whose outputs feed the conditioning, in concatenation
        order.

    ``forward(lr)`` is the ESRGAN super-resolution image (the pretraining objective of the
    encoder; SRFlow does not use it). :meth:`features` gives the flow's conditioning tensors.
    """

    def __init__(self, nf: int, gc: int, nb: int, scale: int, block_idxs: tuple[int, ...]) -> None:
        super().__init__()
        self.scale = scale
        self.block_idxs = tuple(block_idxs)
        self.n_up = int(math.log2(scale))
        self.conv_first = nn.Conv2d(3, nf, 3, 1, 1)
        self.RRDB_trunk = nn.Sequential(*[RRDBBlock(nf, gc) for _ in range(nb)])
        self.trunk_conv = nn.Conv2d(nf, nf, 3, 1, 1)
        for k in range(1, self.n_up + 1):
            setattr(self, f"upconv{k}", nn.Conv2d(nf, nf, 3, 1, 1))
        self.HRconv = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, 3, 3, 1, 1)

    def unused_by_flow(self) -> list[nn.Module]:
        """Submodules the flow's conditioning never reads: the last upconv and the image head."""
        return [getattr(self, f"upconv{self.n_up}"), self.HRconv, self.conv_last]

    def _trunk(self, lr: Tensor) -> tuple[Tensor, dict[int, Tensor]]:
        fea = self.conv_first(lr)
        taps: dict[int, Tensor] = {}
        for i, block in enumerate(self.RRDB_trunk):
            fea = block(fea)
            if i in self.block_idxs:
                taps[i] = fea
        return fea + self.trunk_conv(fea), taps

    def forward(self, lr: Tensor) -> Tensor:
        """ESRGAN SR image (B, 3, scale*h, scale*w) from an LR image (B, 3, h, w)."""
        fea, _ = self._trunk(lr)
        for k in range(1, self.n_up + 1):
            fea = _lrelu(getattr(self, f"upconv{k}")(F.interpolate(fea, scale_factor=2, mode="nearest")))
        return self.conv_last(_lrelu(self.HRconv(fea)))

    def features(self, lr: Tensor, factors: tuple[float, ...]) -> list[Tensor]:
        """Conditioning tensors at ``factor`` times the LR size, one per entry of ``factors``.

        Each is ``cat([fea_up{factor}, nearest(cat(blocks), size)])`` with
        nf * (1 + len(block_idxs)) channels. factors: powers of two from 1/2 to scale/2;
        lr: (B, 3, h, w) with h, w even when 1/2 is requested.
        """
        last_lr_fea, taps = self._trunk(lr)
        blocks = torch.cat([taps[i] for i in self.block_idxs], dim=1)
        feats: dict[float, Tensor] = {1.0: last_lr_fea}
        if 0.5 in factors:
            h, w = last_lr_fea.shape[2:]
            # Official: interpolate(scale_factor=1/2, bilinear, align_corners=False,
            # recompute_scale_factor=True), the same as this for even h, w.
            feats[0.5] = F.interpolate(last_lr_fea, size=(h // 2, w // 2), mode="bilinear", align_corners=False)
        needed_up = max([1, *(f for f in factors if f >= 2)])  # (max(..., default=) breaks a torch.compile graph)
        fea = last_lr_fea
        for k in range(1, int(math.log2(needed_up)) + 1):
            fea = _lrelu(getattr(self, f"upconv{k}")(F.interpolate(fea, scale_factor=2, mode="nearest")))
            feats[float(2**k)] = fea
        out = []
        for f in factors:
            x = feats[float(f)]
            out.append(torch.cat([x, F.interpolate(blocks, size=tuple(x.shape[2:]), mode="nearest")], dim=1))
        return out
