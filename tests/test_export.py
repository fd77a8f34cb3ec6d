"""qconvert export through both exporters (torch.export / dynamo, the default, and TorchScript):
module-path node names, dynamic batch, graphs that quantize like the TorchScript ones, clear errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from converter import QuantConfig, export_torch, quantize
from converter.cli import main
from converter.errors import ModelError
from converter.validation import onnx_module_map

from .conftest import op_counts, run


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock (conv-bn-relu-conv-bn + identity or 1x1 downsample, relu)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, stride=2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.layer1(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def tiny_resnet() -> TinyResNet:
    torch.manual_seed(0)
    net = TinyResNet()
    for m in net.modules():  # non-trivial BatchNorm statistics, so folding them matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return net.eval()


def weighted_names(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]


def test_resnet_block_exports_the_same_through_both_exporters_and_quantizes_alike(tmp_path):
    net = tiny_resnet()
    rng = np.random.default_rng(0)
    calib = [{"input": rng.normal(size=(1, 3, 16, 16)).astype(np.float32)} for _ in range(32)]
    x = rng.normal(size=(20, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        reference = net(torch.from_numpy(x)).numpy()
    results = {}
    for exporter in ("dynamo", "torchscript"):
        path = tmp_path / f"{exporter}.onnx"
        model = export_torch(net, torch.zeros(1, 3, 16, 16), path, exporter=exporter)
        # BatchNorm folded, dynamic batch (20 samples through a batch-1 export), the float model matches PyTorch
        assert "BatchNormalization" not in op_counts(model)
        f = run(path, {"input": x})[0]
        assert np.abs(f - reference).max() < 1e-4
        res = quantize(path, calib, QuantConfig(), output_dir=tmp_path / exporter)
        q = run(res.model_path, {"input": x})[0]
        cos = (f * q).sum(1) / np.linalg.norm(f, axis=1) / np.linalg.norm(q, axis=1)
        results[exporter] = (model, res, cos)
    (dyn, dres, dcos), (ts, tres, tcos) = results["dynamo"], results["torchscript"]
    # the same weighted nodes under the same module-path names (BatchNorm folded into the conv, named after it)
    assert weighted_names(dyn) == weighted_names(ts) == [
        "/conv1/Conv", "/layer1/layer1.0/conv1/Conv", "/layer1/layer1.0/conv2/Conv", "/layer1/layer1.1/conv1/Conv",
        "/layer1/layer1.1/conv2/Conv", "/layer1/layer1.1/downsample/downsample.0/Conv", "/fc/Gemm"]
    assert {k: v for k, v in op_counts(dyn).items() if k in ("Conv", "Gemm", "Add", "Relu")} == \
        {k: v for k, v in op_counts(ts).items() if k in ("Conv", "Gemm", "Add", "Relu")}
    assert dres.report["summary"]["quantized_tensors"] == tres.report["summary"]["quantized_tensors"]
    assert dres.report["summary"]["quantized_tensors"]["weight"] == 7
    assert dres.report["summary"]["float_nodes"] == tres.report["summary"]["float_nodes"] == []
    # the report names the PyTorch modules
    assert "/layer1/layer1.1/downsample/downsample.0/Conv" in dres.report["plan"]["nodes"]
    mapping = onnx_module_map(dyn, net)
    assert mapping["/layer1/layer1.1/downsample/downsample.0/Conv"] == "layer1.1.downsample.0"
    assert dcos.mean() > 0.99 and tcos.mean() > 0.99 and abs(dcos.mean() - tcos.mean()) < 0.005, (dcos, tcos)


def test_digits_torchscript_export_matches_the_default_one(digits, tmp_path):
    """The bundled digits CNN (the `digits` fixture is exported with the default exporter, dynamo): the same
    module-path names and op counts through the TorchScript exporter, and the same INT8 accuracy."""
    from converter.export import load_module_spec

    from .conftest import ROOT

    dyn = onnx.load(str(digits["path"]))
    assert dyn.opset_import[0].version >= 18  # written by the dynamo exporter
    net = load_module_spec(str(ROOT / "models" / "digits_cnn.py:build"))()
    ts = export_torch(net, torch.zeros(1, 1, 8, 8), tmp_path / "ts.onnx", exporter="torchscript")
    assert weighted_names(dyn) == weighted_names(ts) == [
        "/stem/stem.0/Conv", "/res_conv1/Conv", "/res_conv2/Conv", "/conv3/conv3.0/Conv", "/fc1/Gemm", "/fc2/Gemm"]
    assert [n.name for n in dyn.graph.node if n.op_type != "Reshape"] == \
        [n.name for n in ts.graph.node if n.op_type != "Flatten"]  # Flatten: Reshape in the dynamo export
    calib = [{"input": x[None]} for x in digits["x_train"][:100]]
    y = digits["y_test"]
    acc = {}
    for name, path in (("dynamo", digits["path"]), ("torchscript", tmp_path / "ts.onnx")):
        res = quantize(path, calib, QuantConfig(), output_dir=tmp_path / name)
        acc[name] = ((run(path, {"input": digits["x_test"]})[0].argmax(1) == y).mean(),
                     (run(res.model_path, {"input": digits["x_test"]})[0].argmax(1) == y).mean())
        assert res.report["summary"]["quantized_tensors"]["weight"] == 6
    assert acc["dynamo"][0] == acc["torchscript"][0] > 0.95
    assert abs(acc["dynamo"][1] - acc["torchscript"][1]) <= 0.01 and acc["dynamo"][1] >= acc["dynamo"][0] - 0.01, acc


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:  # a Python branch on a tensor's value: torch.export cannot trace it
            x = x * 2
        return self.fc(x)


def test_untraceable_model_is_a_clear_error_naming_the_torchscript_exporter(tmp_path, capsys):
    src = tmp_path / "nets.py"
    src.write_text("import torch\nfrom torch import nn\n\n"
                   "class DataDependent(nn.Module):\n"
                   "    def __init__(self):\n        super().__init__()\n        self.fc = nn.Linear(4, 2)\n\n"
                   "    def forward(self, x):\n        if x.sum() > 0:\n            x = x * 2\n"
                   "        return self.fc(x)\n")
    out = tmp_path / "m.onnx"
    code = main(["export", f"{src}:DataDependent", "--input-shape", "2,4", "-o", str(out)])
    err = capsys.readouterr().err
    assert code != 0 and not out.exists()
    assert "error: torch.export failed on DataDependent" in err and "--exporter torchscript" in err
    assert "Traceback" not in err
    # the other exporter records the path the example input takes
    assert main(["export", f"{src}:DataDependent", "--input-shape", "2,4", "-o", str(out),
                 "--exporter", "torchscript"]) == 0
    assert [n.name for n in onnx.load(str(out)).graph.node if n.op_type == "Gemm"] == ["/fc/Gemm"]
    with pytest.raises(ModelError, match="--exporter torchscript"):
        export_torch(DataDependent(), torch.ones(2, 4), tmp_path / "x.onnx")
