"""Small CNN for scikit-learn's bundled 8x8 handwritten digits.

Use as a model spec: ``models/digits_cnn.py:build``. The trained weights are
bundled beside this file (``digits_cnn.npz``, ~75 KB, made by this file's own
deterministic training on scikit-learn's digits); ``build()`` loads them, so no
training happens on export, validate or batch. Regenerate them with
``python models/digits_cnn.py --write-weights`` (trains for 10-60 s on CPU).

Data
    ``sklearn.datasets.load_digits()``: 1797 real handwritten digits (a copy
    of the UCI ML hand-written digits test set, shipped inside scikit-learn,
    BSD-3-Clause). Fixed split: the first 1200 samples train, the remaining
    597 are held out.

Model
    Input  ``input``: float32 [N, 1, 8, 8], x = pixel / 16 (pixels are 0..16).
    Output 10 logits (digits 0..9).
    Conv-BN-ReLU stem, a residual block (Conv-BN-ReLU-Conv-BN + skip Add,
    ReLU), MaxPool, Conv-BN-ReLU, MaxPool, Flatten, Linear-ReLU-Linear.
    About 18k parameters.

Run ``python models/digits_cnn.py`` to print the bundled weights' held-out
accuracy (``--train`` to train afresh and print that).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

INPUT_SHAPE = (1, 1, 8, 8)
INPUT_NAME = "input"
N_TRAIN = 1200
WEIGHTS = Path(__file__).resolve().with_name("digits_cnn.npz")  # train(seed=0), saved by --write-weights


class DigitsCNN(nn.Module):
    def __init__(self, c1: int = 16, c2: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU()
        )
        self.res_conv1 = nn.Conv2d(c1, c1, 3, padding=1)
        self.res_bn1 = nn.BatchNorm2d(c1)
        self.res_conv2 = nn.Conv2d(c1, c1, 3, padding=1)
        self.res_bn2 = nn.BatchNorm2d(c1)
        # one ReLU module per call site: a reused module is ambiguous for quantization tools
        self.relu_res1, self.relu_res2, self.relu_fc = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)  # 8x8 -> 4x4
        self.conv3 = nn.Sequential(
            nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU()
        )
        self.pool2 = nn.MaxPool2d(2)  # 4x4 -> 2x2
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(c2 * 2 * 2, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        r = self.relu_res1(self.res_bn1(self.res_conv1(x)))
        r = self.res_bn2(self.res_conv2(r))
        x = self.relu_res2(x + r)
        x = self.pool1(x)
        x = self.pool2(self.conv3(x))
        x = self.flatten(x)
        return self.fc2(self.relu_fc(self.fc1(x)))


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (x_train, y_train, x_test, y_test).

    x: float32 [N, 1, 8, 8] scaled pixel/16; y: int64 [N].
    Train = first 1200 samples, test = remaining 597.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = d.target.astype(np.int64)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    return float((pred == y).mean())


def train(seed: int = 0, epochs: int = 30, batch_size: int = 64,
          lr: float = 3e-3) -> nn.Module:
    """Train DigitsCNN deterministically on the fixed split; return it in eval mode.

    The global torch RNG state and the deterministic-algorithms flag are
    restored afterwards, so callers are not affected.
    """
    x_train, y_train, _, _ = load_split()
    xt = torch.from_numpy(x_train)
    yt = torch.from_numpy(y_train)
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = DigitsCNN()
            gen = torch.Generator().manual_seed(seed)
            opt = torch.optim.Adam(model.parameters(), lr=lr)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
            loss_fn = nn.CrossEntropyLoss()
            model.train()
            for _ in range(epochs):
                perm = torch.randperm(len(xt), generator=gen)
                for i in range(0, len(xt), batch_size):
                    idx = perm[i:i + batch_size]
                    opt.zero_grad(set_to_none=True)
                    loss = loss_fn(model(xt[idx]), yt[idx])
                    loss.backward()
                    opt.step()
                sched.step()
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
    return model.eval()


@functools.lru_cache(maxsize=4)
def _trained_state(seed: int) -> dict:
    if seed == 0 and WEIGHTS.is_file():
        with np.load(WEIGHTS, allow_pickle=False) as data:
            return {k: torch.from_numpy(data[k].copy()) for k in data.files}
    print(f"digits_cnn: training (seed {seed}, 30 epochs on 1200 digits; 10-60 s on CPU)...", file=sys.stderr,
          flush=True)
    return {k: v.clone() for k, v in train(seed).state_dict().items()}


def write_weights(path: Path = WEIGHTS) -> Path:
    """Train with seed 0 and save the state dict as .npz (no pickle), the file ``build()`` loads."""
    state = train(0).state_dict()
    np.savez(path, **{k: v.detach().cpu().numpy() for k, v in state.items()})
    return path


def build(seed: int = 0) -> nn.Module:
    """Return the trained DigitsCNN in eval mode (bundled weights for seed 0, else trained on first use)."""
    model = DigitsCNN()
    model.load_state_dict(_trained_state(seed))
    return model.eval()


if __name__ == "__main__":
    import time

    _, _, x_test, y_test = load_split()
    if "--write-weights" in sys.argv:
        t0 = time.perf_counter()
        print(f"wrote {write_weights()} ({time.perf_counter() - t0:.1f} s)")
    t0 = time.perf_counter()
    m = train() if "--train" in sys.argv else build()
    dt = time.perf_counter() - t0
    n = sum(p.numel() for p in m.parameters())
    print(f"params={n} held-out accuracy={accuracy(m, x_test, y_test):.4f} "
          f"({len(y_test)} samples) build_time={dt:.2f}s "
          f"threads={torch.get_num_threads()}")
