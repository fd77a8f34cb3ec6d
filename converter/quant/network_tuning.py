"""Network tuning: every quantized layer's per-channel weight scale and its bias learned end to end, against the
float model's outputs on calibration data.

The layer-wise techniques (AdaRound and its local search, AdaQuant, block reconstruction, bias correction) each fit
one layer or block to its own float output; what reaches the model's output is the sum of their residual errors
after every later layer has transformed it. This pass fits what they leave, at the output: with each weight's
integers fixed (``q``, whatever rounding chose them), the whole quantized model runs in torch, activations
fake-quantized as the QDQ model quantizes them (straight-through), and Adam learns per output channel::

    W~ = s * exp(g) * (q - z)        b~ = b + d

(``g`` a log-factor of the weight encoding's scale, one per scale value: per output channel, or per block of a
block-wise encoding; ``d`` the bias's offset; both start at 0, so the model starts as the QDQ model is) to minimise
the mean squared error of the model's outputs against the float model's (the model as it was before the encoded
stage changed any weight or bias), over :data:`EPOCHS` passes of the calibration samples in minibatches, the rates
annealed (cosine). Few parameters (two per output channel; block-wise weights: a scale factor per block) against
every output of every sample: where a model has many outputs per parameter this generalizes, where learning the
rounding end to end does not (measured on EfficientNet-Lite0: that fits the 100 calibration images and loses 80 of
900 held-out ones); a model with few outputs (ResNet-8's 10 classes) still fits its calibration samples. It is
BRECQ's network-wise reconstruction with the rounding left to the layer-wise techniques, and AdaQuant's bias/scale
tuning done at the output rather than per layer (Li et al. 2021; Hubara et al. 2021).

Every :data:`VALIDATE`-th calibration sample is held out of the training and judges it: the parameters of the
epoch with the lowest output error on those samples are the result, kept only where that error is below where it
started (measured: ResNet-8, 10 outputs and 128 samples against ~800 parameters, fits its calibration images and
lost 23 of 2000 held-out images without this check). Weight encodings take
the learned scales (zero points kept) and are frozen; each weight initializer becomes its grid values ``s' (q -
z)``, so nearest rounding gives ``q`` back; biases are written into the float model (their int32 encodings follow
from the new scales). Memory: the calibration samples (at most :data:`SAMPLES`) and their float outputs, plus one
minibatch's activations for the backward pass. Image inputs (4-D) run channels-last: torch's CPU convolutions
forward + backward 1.7x faster (EfficientNet-Lite0's tuning 219 -> 89 s on 2 cores). Models with control flow,
several inputs or outputs, or an op the torch table (:data:`converter.quant.reconstruction.OPS`) lacks are left as
they are (logged).

``mixup`` (:func:`_mixed`): each step blends its samples with others and fits the float model's outputs on the
blends ("function matching", Beyer et al. 2022: a student matches its teacher on inputs between the data points,
which stretches few samples over more epochs without fitting them). The held-out quarter is judged on the samples
as they are. Measured on EfficientNet-Lite0 W4A8 (`/tmp` harness, the documented setting, 1 thread): 12 epochs
without it KL to FP32 0.0914, with it 0.0940; 24 epochs with it 0.0871; with 200 of AdaRound's Adam steps before
the search, 24 epochs with it 0.0823 (top-1 768 / 770 / 776 of 900, within noise of each other); that last setting
as the tool's row on 2 threads: 771/900 in 442 s (the tuning 205 s; its held-out calibration error 0.061 against
0.065 without mixup). Off by default.

Measured on EfficientNet-Lite0 W4A8 (asymmetric 4-bit weights, first/last layer 8 bits, AdaRound's local search +
bias correction, 100 calibration / 900 held-out images): 763 -> 769-772/900 with 12 epochs, 774 with percentile
activation ranges (89 s on 2 CPU cores channels-last; 220-260 s before); block-wise weights (64 input channels per
scale) 771 -> 778; ResNet-8 W4A8: 1540 -> 1514/2000 (see the held-out check above).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Any, Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from .adaround import _scale, _zero, adaround_layers
from .control_flow import has_control_flow, render_control_flow
from .encoding import Encoding
from .plan import QuantPlan
from .reconstruction import Unit, _Unit, _Unsupported, activation_encodings
from .torch_device import resolve_device
from ..graph.index import GraphIndex

log = logging.getLogger("converter")

EPOCHS = 12  # passes over the calibration samples
SAMPLES = 128  # calibration samples at most
MINIBATCH = 25  # samples per step
SCALE_LR = 1e-3  # Adam's rate for the scales' log-factors
BIAS_LR = 1e-3  # ... for the biases, times each layer's mean |bias|
VALIDATE = 4  # every 4th calibration sample is held out to pick the epoch (and whether to keep the result)


@dataclass
class Tuned:
    """What network tuning did."""

    layers: int
    samples: int
    epochs: int
    seconds: float
    loss_before: float  # mean squared output error per element, all cached samples
    loss_after: float
    kept: bool
    scale_change: float  # mean |s'/s - 1| over the layers' scales
    held_out_before: float = 0.0  # the same on the held-out calibration samples (every VALIDATE-th)
    held_out_after: float = 0.0
    best_epoch: int = 0  # the epoch kept (0: none beat the start)
    mixup: bool = False  # trained on blended samples (the module doc)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "samples": self.samples, "epochs": self.epochs,
                "seconds": round(self.seconds, 3), "loss_before": self.loss_before, "loss_after": self.loss_after,
                "held_out_before": self.held_out_before, "held_out_after": self.held_out_after,
                "best_epoch": self.best_epoch, "kept": self.kept, "scale_change": self.scale_change,
                "mixup": self.mixup}


def tune_network(model: onnx.ModelProto, plan: QuantPlan, idx: GraphIndex, batches: Iterable[dict[str, np.ndarray]],
                 originals: dict[str, np.ndarray], *, epochs: int = EPOCHS, seed: int = 0, threads: int = 0,
                 device: str = "auto", float_weights: dict[str, np.ndarray] | None = None,
                 frozen: dict[str, Encoding] | None = None, mixup: bool = False) -> Tuned | None:
    """Tune ``model``'s quantized layers in place (module doc). ``originals``: weights/biases the encoded stage
    changed, as they were before (the float model the outputs are fitted to). Returns None where the model cannot
    run in torch here."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _tune(model, plan, idx, list(batches), originals, epochs, seed, resolve_device(device),
                     {} if float_weights is None else float_weights, {} if frozen is None else frozen, mixup)
    finally:
        torch.set_num_threads(before)


def _whole_graph(model: onnx.ModelProto, plan: QuantPlan, idx: GraphIndex) -> Unit | None:
    g = model.graph
    if has_control_flow(model):
        log.info("network tuning: the model has control flow (If/Loop/Scan): left as it is")
        return None
    inputs = [i.name for i in g.input if i.name not in idx.initializers]
    if len(inputs) != 1 or len(g.output) != 1:
        log.info("network tuning: the model has %d inputs and %d outputs (one of each is supported): left as it is",
                 len(inputs), len(g.output))
        return None
    layers = adaround_layers(model, plan, idx)
    if not layers:
        return None
    return Unit([n for n in g.node if n.op_type != "Constant"], inputs[0], g.output[0].name, layers)


def _scale_tensors(lay, w: np.ndarray, device: str):
    """The weight encoding's scale and zero point broadcastable to the weight (torch; AdaRound's spread, blocks
    included), and the log-factors learned for the scale: one per scale value (per channel, or per block of a
    block-wise encoding), zero to start."""
    import torch

    s = torch.from_numpy(np.array(_scale(lay, w), np.float32)).to(device)
    z = torch.from_numpy(np.array(_zero(lay, w), np.float32)).to(device)
    shape = lay.enc.block_shape if lay.enc.blocked else s.shape
    return s, z, torch.zeros(shape, device=device, requires_grad=True)


def _spread(enc: Encoding, g, shape):
    """Per-block log-factors ``g`` repeated over their blocks (as :meth:`Encoding.expanded`); others as they are."""
    import torch

    if not enc.blocked:
        return g
    return torch.repeat_interleave(g, enc.block_size, dim=enc.axis).narrow(enc.axis, 0, shape[enc.axis])


def _mixed(xt, pick, train, gen, target_of):
    """Mixup for function matching: each sample of the minibatch ``pick`` blended with a random training sample,
    ``lam x_a + (1 - lam) x_b`` with ``lam ~ Beta(1, 1)`` folded to >= 0.5 (the sample stays mostly itself), and the
    float model's outputs on the blends as the target (the module doc)."""
    import torch

    other = train[torch.randint(len(train), (len(pick),), generator=gen)].to(xt.device)
    lam = torch.rand(len(pick), generator=gen).to(xt.device)
    lam = torch.maximum(lam, 1 - lam).view(-1, *([1] * (xt.dim() - 1)))
    x = lam * xt[pick] + (1 - lam) * xt[other]
    if xt.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        return x, target_of(x)


def _tune(model, plan, idx, batches, originals, epochs, seed, device, float_weights, frozen,
          mixup=False) -> Tuned | None:
    import torch
    from ..progress import tqdm

    unit = _whole_graph(model, plan, idx)
    if unit is None or not batches:
        return None
    t0 = time.perf_counter()
    act = activation_encodings(render_control_flow(model, plan.encodings), plan, {lay.weight for lay in unit.layers})
    try:
        fn = _Unit(unit, idx, act, device)
    except _Unsupported as e:
        log.warning("network tuning: op %s has no torch form here: the model is left as the layer-wise techniques "
                    "made it", e)
        return None
    x = np.concatenate([b[unit.input] for b in batches]).astype(np.float32)[:SAMPLES]
    xt = torch.from_numpy(np.ascontiguousarray(x)).to(device)
    if xt.dim() == 4:  # NCHW images: torch's CPU convolutions run 1.7x faster forward + backward in channels-last
        xt = xt.contiguous(memory_format=torch.channels_last)
    n = len(xt)
    if mixup and not xt.is_floating_point():
        log.info("network tuning: the input is %s, not float: no mixup (blends of token ids mean nothing)", xt.dtype)
        mixup = False
    float_values = {k: torch.from_numpy(np.array(v, np.float32)).to(device) for k, v in originals.items()}
    with torch.no_grad():
        target = torch.cat([fn(xt[a:a + MINIBATCH], float_values) for a in range(0, n, MINIBATCH)])

    state = []
    for lay in unit.layers:
        w = idx.constant(lay.weight).astype(np.float32)
        s, z, g = _scale_tensors(lay, w, device)
        q = torch.from_numpy(lay.enc.quantize(w).astype(np.float32)).to(device)
        st = {"layer": lay, "s": s, "qz": q - z, "g": g}
        b_name = lay.node.input[2] if len(lay.node.input) > 2 and lay.node.input[2] else None
        if b_name and len(idx.uses(b_name)) == 1:
            b0 = torch.from_numpy(idx.constant(b_name).astype(np.float32)).to(device)
            st.update(b_name=b_name, b0=b0, d=torch.zeros_like(b0, requires_grad=True),
                      b_lr=BIAS_LR * (float(b0.abs().mean()) + 1e-3))
        state.append(st)

    def overrides() -> dict[str, Any]:
        out = {}
        for st in state:
            out[st["layer"].weight] = st["s"] * torch.exp(_spread(st["layer"].enc, st["g"], st["qz"].shape)) * st["qz"]
            if "d" in st:
                out[st["b_name"]] = st["b0"] + st["d"]
        return out

    def full_loss(rows=None) -> float:
        rows = torch.arange(n) if rows is None else rows
        with torch.no_grad():
            ov = overrides()
            total = sum(float(((fn(xt[rows[a:a + MINIBATCH]], ov, quant=True) - target[rows[a:a + MINIBATCH]]) ** 2)
                              .sum()) for a in range(0, len(rows), MINIBATCH))
        return total / (target[0].numel() * len(rows))

    def snapshot():
        return [(st["g"].detach().clone(), st["d"].detach().clone() if "d" in st else None) for st in state]

    # every VALIDATE-th sample judges the epochs (the rest trains): the result is the epoch with the lowest error
    # on them, kept only if that is below where it started (a small model on few samples fits them otherwise)
    val = torch.arange(0, n, VALIDATE)
    train = torch.tensor([i for i in range(n) if i % VALIDATE])
    loss_before = full_loss()
    val_before = best_val = full_loss(val)
    best, best_epoch = snapshot(), 0
    groups = [{"params": [st["g"]], "lr": SCALE_LR} for st in state]
    groups += [{"params": [st["d"]], "lr": st["b_lr"]} for st in state if "d" in st]
    opt = torch.optim.Adam(groups)
    m = min(MINIBATCH, len(train))
    per_epoch = max(len(train) // m, 1)
    steps = epochs * per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i / max(steps, 1), 1))))
    gen = torch.Generator().manual_seed(seed)
    with tqdm(total=steps, desc="network tuning", unit="step", disable=None, leave=False) as bar:
        for epoch in range(epochs):
            perm = train[torch.randperm(len(train), generator=gen)].to(device)
            for a in range(0, per_epoch * m, m):
                pick = perm[a:a + m]
                xb, tb = _mixed(xt, pick, train, gen, lambda x: fn(x, float_values)) if mixup else \
                    (xt[pick], target[pick])
                loss = ((fn(xb, overrides(), quant=True) - tb) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
            v = full_loss(val)
            if v < best_val:
                best_val, best, best_epoch = v, snapshot(), epoch + 1
    with torch.no_grad():
        for st, (g_best, d_best) in zip(state, best):
            st["g"].copy_(g_best)
            if d_best is not None:
                st["d"].copy_(d_best)
    loss_after = full_loss()
    kept = best_epoch > 0 and loss_after < loss_before
    changes = []
    if kept:
        with torch.no_grad():
            for st in state:
                lay = st["layer"]
                enc = lay.enc
                factor = torch.exp(st["g"]).cpu().numpy().reshape(-1)
                new_scale = np.asarray(enc.scale, np.float32) * factor
                changes += list(np.abs(factor - 1))
                new = replace(enc, scale=tuple(float(v) for v in new_scale))
                w = idx.constant(lay.weight)
                q = enc.quantize(w)
                values = new.dequantize(q).astype(w.dtype)
                if not np.array_equal(new.quantize(values), q):
                    raise RuntimeError(f"internal error: tuned weight {lay.weight!r} does not round back")
                float_weights.setdefault(lay.weight, np.asarray(originals.get(lay.weight, w)))
                idx.initializers[lay.weight].CopyFrom(numpy_helper.from_array(values, lay.weight))
                frozen[lay.weight] = new
                plan.encodings[lay.weight] = new
                lay.enc = new
                if "d" in st:
                    b_old = idx.constant(st["b_name"])
                    b_new = (st["b0"] + st["d"]).cpu().numpy().reshape(b_old.shape).astype(b_old.dtype)
                    idx.initializers[st["b_name"]].CopyFrom(numpy_helper.from_array(b_new, st["b_name"]))
    result = Tuned(len(state), n, epochs, time.perf_counter() - t0, loss_before, loss_after, kept,
                   float(np.mean(changes)) if changes else 0.0, val_before, best_val, best_epoch, mixup)
    log.info("network tuning: %d layer(s), %d samples%s, %d epochs on %s; output error %.4g -> %.4g, held-out "
             "samples %.4g -> %.4g (best epoch %d: %s), %.1f s", result.layers, n, " mixed" if mixup else "", epochs,
             device, loss_before,
             loss_after, val_before, best_val, best_epoch, "kept" if kept else "not kept", result.seconds)
    return result
