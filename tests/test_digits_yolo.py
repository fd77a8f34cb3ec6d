"""models/digits_yolo.py: a YOLOv8-style detector trained on real digits, exported, and quantized.

What is asserted is what the model is (its exported ops: SiLU after every Conv, BN folded, the DFL Softmax and
arange Conv, one Concat head), that the FP32 ONNX detects what the trained torch model detects, that the trainer
is deterministic, and that ``quantize`` runs on it with its backbone Convs on 8-bit weights. How well the
quantized model scores is issue 28's measurement (tools/any_model_bench.py), which other changes move.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

from converter import QuantConfig, export_torch, quantize

from .conftest import load_models_module


@pytest.fixture(scope="module")
def yolo(tmp_path_factory):
    import torch

    mod = load_models_module("digits_yolo")
    model = mod.build()
    path = tmp_path_factory.mktemp("yolo") / "digits_yolo.onnx"
    export_torch(model, torch.zeros(mod.INPUT_SHAPE), path)
    x, gt = mod.make_data(500, seed=1)  # held out: the digits after the 1200 training ones
    with torch.no_grad():
        torch_out = model(torch.from_numpy(x)).numpy()
    return {"mod": mod, "path": path, "onnx": onnx.load(str(path)), "x": x, "gt": gt, "torch_out": torch_out}


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for t in n.input:
            out.setdefault(t, []).append(n)
    return out


def test_exported_graph_is_yolov8_style(yolo):
    model, mod = yolo["onnx"], yolo["mod"]
    ops = Counter(n.op_type for n in model.graph.node)
    assert "BatchNormalization" not in ops  # folded into the Convs at export
    consumers = _consumers(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    # SiLU = Sigmoid(x) * x after every Conv but the three 1x1 output Convs (box bins, scores, DFL)
    silu = [c for c in convs
            if sorted(n.op_type for n in consumers[c.output[0]]) == ["Mul", "Sigmoid"]
            and any(s.output[0] in m.input for s in consumers[c.output[0]] if s.op_type == "Sigmoid"
                    for m in consumers[c.output[0]] if m.op_type == "Mul")]
    assert len(convs) == 15 and len(silu) == 12
    # DFL: Softmax over the REG_MAX bins, then a 1x1 Conv whose weight is arange(REG_MAX)
    (softmax,) = [n for n in model.graph.node if n.op_type == "Softmax"]
    (dfl,) = [n for n in consumers[softmax.output[0]] if n.op_type == "Conv"]
    init = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    np.testing.assert_array_equal(init[dfl.input[1]].reshape(-1), np.arange(mod.REG_MAX, dtype=np.float32))
    # one Concat of boxes and Sigmoid scores makes the single output [N, 16, 15]
    assert [o.name for o in model.graph.output] == ["output"]
    head = producer["output"]
    while head.op_type != "Concat":
        head = producer[head.input[0]]
    assert {producer[t].op_type for t in head.input} >= {"Sigmoid"}
    assert len(head.input) == 2


def test_fp32_onnx_detects_what_training_gave(yolo):
    from converter.ort_session import create_session

    mod = yolo["mod"]
    sess = create_session(str(yolo["path"]), optimization="all")
    out = np.concatenate([sess.run(None, {mod.INPUT_NAME: yolo["x"][i:i + 100]})[0] for i in range(0, 500, 100)])
    assert out.shape == (500, 16, 15)
    np.testing.assert_allclose(out, yolo["torch_out"], rtol=1e-4, atol=2e-3)  # boxes in pixels of 320
    acc_onnx = mod.detection_accuracy(out, yolo["gt"])
    acc_torch = mod.detection_accuracy(yolo["torch_out"], yolo["gt"])
    assert acc_onnx == pytest.approx(acc_torch, abs=0.002)  # one digit of 750 at most
    assert acc_onnx > 0.9  # trained: 0.9317 on these 500 canvases
    assert mod.false_positive_rate(out, yolo["gt"]) < 0.02
    # boxes span the 320-pixel frame, scores are probabilities
    assert out[..., :4].max() > 250 and 0.0 <= out[..., 4:].min() and out[..., 4:].max() <= 1.0


def test_trainer_is_deterministic():
    import torch

    mod = load_models_module("digits_yolo")
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = mod.train(seed=3, n_images=128, epochs=1).state_dict()
    assert torch.equal(torch.rand(1), before)  # train() leaves the global RNG as it found it
    b = mod.train(seed=3, n_images=128, epochs=1).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)  # what train(seed=3) starts from
        init = mod.DigitsYolo().state_dict()
    moved = [k for k in a if k.endswith("weight") and not torch.equal(a[k], init[k])]
    fixed = [k for k in a if k.endswith("weight") and torch.equal(a[k], init[k])]
    assert fixed == ["dfl.conv.weight"] and len(moved) > 20  # it trained all but the DFL's arange


def test_bundled_weights_are_small():
    mod = load_models_module("digits_yolo")
    assert mod.WEIGHTS.is_file() and mod.WEIGHTS.stat().st_size < 1_000_000


def test_quantize_runs_on_the_detector(yolo, tmp_path):
    from converter.ort_session import create_session

    mod = yolo["mod"]
    x_cal, _ = mod.make_data(64, seed=10)
    calib = [{mod.INPUT_NAME: x_cal[i:i + 16]} for i in range(0, 64, 16)]
    res = quantize(str(yolo["path"]), calib, QuantConfig(), output_dir=tmp_path, name="yolo")
    qdq = onnx.load(str(res.model_path))
    producer = {o: n for n in qdq.graph.node for o in n.output}
    convs = [n for n in qdq.graph.node if n.op_type == "Conv"]
    assert len(convs) == 15  # no layer lost or duplicated
    on_int8_weights = [c for c in convs if getattr(producer.get(c.input[1]), "op_type", None) == "DequantizeLinear"]
    assert len(on_int8_weights) >= 12  # at least the backbone's and the heads' Conv-SiLU layers
    out = create_session(str(res.model_path), optimization="all").run(None, {mod.INPUT_NAME: yolo["x"][:100]})[0]
    assert out.shape == (100, 16, 15) and np.isfinite(out).all()
    assert mod.detection_accuracy(out, yolo["gt"][:100]) > 0.5  # a detector still: FP32 0.93
    assert res.report_path.exists() and res.encodings_path.exists()
