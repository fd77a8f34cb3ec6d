"""YOLOv8-style detector of real handwritten digits: SiLU after every Conv, a DFL box head, Sigmoid scores.

Use as a model spec: ``models/digits_yolo.py:build``. The weights trained by this file (seed 0) are bundled
beside it (``digits_yolo.npz``); ``python models/digits_yolo.py --write-weights`` trains them again
(deterministic, about a minute of CPU on one thread).

Data, output layout and scoring are those of ``models/digits_detector.py`` (reused, not copied):
``make_data`` (real 8x8 digits from ``sklearn.datasets.load_digits`` pasted on 32x32 canvases; digits
0..1199 for training, the rest for calibration / evaluation), ``detection_accuracy``, ``ScoreAgreement``
and ``score_resolution``. This model differs in what a YOLOv8 export contains:

* every Conv is Conv-BN-SiLU (the exporter folds BN into the Conv; SiLU exports as Sigmoid + Mul);
* a C2f-like block (Split, a residual bottleneck, Concat, 1x1 Conv) at stride 8;
* two head branches as in YOLOv8 (box: Conv-BN-SiLU + 1x1 Conv to 4 x ``REG_MAX`` bins; scores: Conv-BN-SiLU +
  1x1 Conv to objectness + 10 classes);
* DFL as YOLOv8 writes it: per box side a distribution over ``REG_MAX`` bins, Softmax over the bins, then a
  fixed 1x1 Conv whose weights are ``arange(REG_MAX)`` (the expected bin); the four distances (left, top,
  right, bottom from the cell centre, in units of ``BIN`` canvas pixels) decode to a box ``cx, cy, w, h`` in
  pixels of the 320-pixel frame (dist2bbox: Sub/Add/Mul);
* scores through Sigmoid, and ONE Concat of boxes (0..320) and scores (0..1) as the single output
  ``output`` [N, 16, 15]: rows ``[cx, cy, w, h, objectness, p0..p9]``, one per cell of a 4x4 grid.

Held-out detection accuracy of the bundled weights: see ``python models/digits_yolo.py`` (500 canvases,
seed 1) and tests/test_digits_yolo.py.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn


def _detector_module():
    """models/digits_detector.py (models/ is a folder of scripts, not a package)."""
    name = "_models_digits_detector"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().with_name("digits_detector.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_det = _detector_module()
make_data = _det.make_data
encode_targets = _det.encode_targets
detection_accuracy = _det.detection_accuracy
false_positive_rate = _det.false_positive_rate
ScoreAgreement = _det.ScoreAgreement
score_resolution = _det.score_resolution

CANVAS, GRID, STRIDE, FRAME_SCALE, N_CLASSES = _det.CANVAS, _det.GRID, _det.STRIDE, _det.FRAME_SCALE, _det.N_CLASSES
INPUT_SHAPE, INPUT_NAME = _det.INPUT_SHAPE, _det.INPUT_NAME
CELLS = GRID * GRID
REG_MAX = 8  # bins per box side
BIN = 2.0  # canvas pixels per bin: distances 0..14 canvas pixels from the cell centre


# --- model ---------------------------------------------------------------------------------------

class CBS(nn.Sequential):
    """Conv-BN-SiLU, YOLOv8's ``Conv``."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1) -> None:
        super().__init__(nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


class C2f(nn.Module):
    """YOLOv8's C2f with one bottleneck: 1x1 CBS, split in two, a residual bottleneck on one half, concat of
    the three, 1x1 CBS."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.c = cout // 2
        self.cv1 = CBS(cin, 2 * self.c, 1)
        self.m = nn.Sequential(CBS(self.c, self.c), CBS(self.c, self.c))
        self.cv2 = CBS(3 * self.c, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.cv1(x).chunk(2, 1)
        return self.cv2(torch.cat([a, b, b + self.m(b)], 1))


class DFL(nn.Module):
    """YOLOv8's DFL: Softmax over ``REG_MAX`` bins, then a fixed 1x1 Conv with weights arange(REG_MAX)."""

    def __init__(self, reg_max: int = REG_MAX) -> None:
        super().__init__()
        self.reg_max = reg_max
        self.conv = nn.Conv2d(reg_max, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(reg_max, dtype=torch.float32).view(1, reg_max, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [N, 4 * reg_max, cells] -> [N, 4, cells]
        return self.conv(x.view(-1, 4, self.reg_max, CELLS).transpose(2, 1).softmax(1)).view(-1, 4, CELLS)


class DigitsYolo(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (16, 24, 32, 32, 48, 48)) -> None:
        super().__init__()
        w = widths
        self.backbone = nn.Sequential(
            CBS(1, w[0]),               # 32x32
            CBS(w[0], w[1], stride=2),  # 16x16
            CBS(w[1], w[2]),
            CBS(w[2], w[3], stride=2),  # 8x8
            C2f(w[3], w[3]),
            CBS(w[3], w[4], stride=2),  # 4x4
            CBS(w[4], w[5]),
        )
        self.box_head = nn.Sequential(CBS(w[5], 32), nn.Conv2d(32, 4 * REG_MAX, 1))
        self.score_head = nn.Sequential(CBS(w[5], 32), nn.Conv2d(32, 1 + N_CLASSES, 1))
        self.dfl = DFL()
        gy, gx = np.meshgrid(np.arange(GRID), np.arange(GRID), indexing="ij")
        anchors = np.stack([gx.reshape(-1) + 0.5, gy.reshape(-1) + 0.5]) * STRIDE / BIN  # cell centres, in bins
        self.register_buffer("anchors", torch.from_numpy(anchors.astype(np.float32))[None])  # [1, 2, cells]
        self.register_buffer("scale", torch.tensor(BIN * FRAME_SCALE))

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw head outputs: box bins [N, 4 * REG_MAX, cells], scores [N, 11, cells] (pre-sigmoid)."""
        f = self.backbone(x)
        return self.box_head(f).view(-1, 4 * REG_MAX, CELLS), self.score_head(f).view(-1, 1 + N_CLASSES, CELLS)

    def decode(self, dist: torch.Tensor) -> torch.Tensor:
        """YOLOv8's dist2bbox (xywh): distances [N, 4, cells] (l, t, r, b in bins) -> [N, 4, cells] frame pixels."""
        lt, rb = dist.chunk(2, 1)
        x1y1, x2y2 = self.anchors - lt, self.anchors + rb
        return torch.cat([(x1y1 + x2y2) / 2, x2y2 - x1y1], 1) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        box_l, score_l = self.logits(x)
        boxes = self.decode(self.dfl(box_l))
        return torch.cat([boxes, score_l.sigmoid()], 1).transpose(1, 2)  # [N, cells, 15]


# --- training ------------------------------------------------------------------------------------

def _distance_targets(gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per cell: positive mask [n, cells] and l, t, r, b distances in bins [n, cells, 4] from the cell centre."""
    n = len(gt)
    pos = np.zeros((n, CELLS), bool)
    dist = np.zeros((n, CELLS, 4), np.float32)
    px = STRIDE * FRAME_SCALE  # frame pixels per cell
    for i in range(n):
        for valid, _, cx, cy, w, h in gt[i]:
            if not valid:
                continue
            gx, gy = min(int(cx // px), GRID - 1), min(int(cy // px), GRID - 1)
            j = gy * GRID + gx
            ax, ay = (gx + 0.5) * px, (gy + 0.5) * px
            pos[i, j] = True
            edges = np.array([ax - (cx - w / 2), ay - (cy - h / 2), (cx + w / 2) - ax, (cy + h / 2) - ay])
            dist[i, j] = np.clip(edges / (BIN * FRAME_SCALE), 0, REG_MAX - 1.01)
    return pos, dist


def _dfl_loss(bins: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """YOLOv8's distribution focal loss: cross-entropy to the two bins around each target distance, weighted
    by nearness. bins [m, 4, REG_MAX] logits, target [m, 4]."""
    left = target.long()
    wl = left + 1 - target
    logp = bins.log_softmax(-1)
    return -(logp.gather(-1, left[..., None])[..., 0] * wl
             + logp.gather(-1, (left + 1)[..., None])[..., 0] * (1 - wl)).mean()


def train(seed: int = 0, n_images: int = 3000, epochs: int = 15, batch_size: int = 64, lr: float = 5e-3) -> nn.Module:
    """Train deterministically on canvases of the training digits; return the model in eval mode.

    The global torch RNG state, thread count and deterministic-algorithms flag are restored afterwards.
    """
    x, gt = make_data(n_images, seed, split="train")
    tg = encode_targets(gt)
    pos_np, dist_np = _distance_targets(gt)
    xt = torch.from_numpy(x)
    obj_t, cls_t = torch.from_numpy(tg["obj"]), torch.from_numpy(tg["cls"])
    pos_t, dist_t = torch.from_numpy(pos_np), torch.from_numpy(dist_np)
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_threads = torch.get_num_threads()
    bce = nn.BCEWithLogitsLoss()
    try:
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = DigitsYolo()
            gen = torch.Generator().manual_seed(seed)
            opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
            steps = epochs * ((len(xt) + batch_size - 1) // batch_size)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
            model.train()
            for _ in range(epochs):
                perm = torch.randperm(len(xt), generator=gen)
                for i in range(0, len(xt), batch_size):
                    idx = perm[i:i + batch_size]
                    box_l, score_l = model.logits(xt[idx])
                    score_l = score_l.transpose(1, 2)  # [b, cells, 11]
                    obj, cls, pos = obj_t[idx], cls_t[idx], pos_t[idx]
                    loss = 2 * bce(score_l[..., 0], obj)
                    if pos.any():
                        onehot = nn.functional.one_hot(cls[pos], N_CLASSES).float()
                        cls_l = score_l[..., 1:][pos]
                        loss = loss + 4 * bce(cls_l, onehot) + nn.functional.cross_entropy(cls_l, cls[pos])
                        bins = box_l.view(-1, 4, REG_MAX, CELLS).permute(0, 3, 1, 2)[pos]  # [m, 4, REG_MAX]
                        target = dist_t[idx][pos]
                        expected = (bins.softmax(-1) * torch.arange(REG_MAX, dtype=torch.float32)).sum(-1)
                        loss = loss + _dfl_loss(bins, target) + (expected - target).abs().mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
        torch.set_num_threads(prev_threads)
    return model.eval()


WEIGHTS = Path(__file__).resolve().with_name("digits_yolo.npz")  # train(seed=0), saved by --write-weights


@functools.lru_cache(maxsize=4)
def _trained_state(seed: int) -> dict:
    """Seed 0: the bundled weights (no training, no pickle); another seed: trained in this process."""
    if seed == 0 and WEIGHTS.is_file():
        with np.load(WEIGHTS) as data:
            return {k: torch.from_numpy(data[k].copy()) for k in data.files}
    print(f"digits_yolo: training (seed {seed}; about a minute of CPU)...", file=sys.stderr, flush=True)
    return {k: v.clone() for k, v in train(seed).state_dict().items()}


def write_weights(path: Path = WEIGHTS) -> Path:
    """Train with seed 0 and save the state dict as .npz (float16 would change the figures: float32), the
    file ``build()`` loads."""
    np.savez(path, **{k: v.detach().cpu().numpy() for k, v in train(0).state_dict().items()})
    return path


def build(seed: int = 0) -> nn.Module:
    """Return the trained DigitsYolo in eval mode (bundled weights for seed 0, else trained on first use)."""
    model = DigitsYolo()
    model.load_state_dict(_trained_state(seed))
    return model.eval()


if __name__ == "__main__":
    import time

    if "--write-weights" in sys.argv:
        t0 = time.perf_counter()
        print(f"wrote {write_weights()} ({time.perf_counter() - t0:.1f} s)")
    t0 = time.perf_counter()
    m = build()
    dt = time.perf_counter() - t0
    x, gt = make_data(500, seed=1)
    with torch.no_grad():
        out = m(torch.from_numpy(x)).numpy()
    n = sum(p.numel() for p in m.parameters())
    print(f"params={n} detection accuracy={detection_accuracy(out, gt):.4f} "
          f"false positives={false_positive_rate(out, gt):.4f} (500 held-out canvases) build_time={dt:.2f}s "
          f"boxes {out[..., :4].min():.1f}..{out[..., :4].max():.1f} probs {out[..., 4:].min():.3f}.."
          f"{out[..., 4:].max():.3f}")
