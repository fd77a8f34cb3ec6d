"""Model validation: one tiny model per finding (ONNX and PyTorch side), the CLI and its exit codes."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import helper, numpy_helper

from converter import QuantConfig, quantize
from converter.cli import main
from converter.errors import EXIT_CHECK_FAILED
from converter.validation import Finding, format_table, validate_onnx
from converter.validation import onnx_module_map, validate_torch

from .conftest import parse, run

F32 = np.float32
CONV = """
<ir_version: 8, opset_import: ["" : 17]>
m (float[N,3,4,4] x) => (float[N,2,4,4] y) {
  c = Conv(x, W)
  y = Relu(c)
}
"""


def weights(rng, *shape):
    return rng.normal(0, 0.3, shape).astype(F32)


def codes(findings: list[Finding], severity: str | None = None) -> set[str]:
    return {f.code for f in findings if severity is None or f.severity == severity}


def find(findings: list[Finding], code: str) -> Finding:
    return next(f for f in findings if f.code == code)


def save(model: onnx.ModelProto, path) -> str:
    path.write_bytes(model.SerializeToString())
    return str(path)


# --- ONNX findings ------------------------------------------------------------------------------------

def test_clean_model_has_no_errors_or_warnings(rng):
    findings = validate_onnx(parse(CONV, W=weights(rng, 2, 3, 1, 1)))
    assert not codes(findings, "error") and not codes(findings, "warning"), format_table(findings)
    assert "dynamic-batch" in codes(findings, "info")


def test_opset_below_10_is_an_error_and_upgrade_fixes_it(tmp_path, rng, capsys):
    model = parse(CONV.replace('"" : 17', '"" : 9').replace("ir_version: 8", "ir_version: 4"), W=weights(rng, 2, 3, 1, 1))
    f = find(validate_onnx(model), "opset-too-old")
    assert f.severity == "error" and "opset 9" in f.message and "--upgrade-opset" in f.fix
    path = save(model, tmp_path / "old.onnx")
    assert main(["validate", path]) == EXIT_CHECK_FAILED
    up = tmp_path / "up.onnx"
    assert main(["validate", path, "--upgrade-opset", "-o", str(up), "--json", str(tmp_path / "v.json")]) == 0
    assert next(i.version for i in onnx.load(str(up)).opset_import if i.domain == "") == 13
    doc = json.loads((tmp_path / "v.json").read_text())
    assert doc["passed"] and doc["findings"][0]["code"] == "opset-upgraded"


def test_opset_below_13_is_upgraded_automatically(rng):
    model = parse(CONV.replace('"" : 17', '"" : 11').replace("ir_version: 8", "ir_version: 6"), W=weights(rng, 2, 3, 1, 1))
    f = find(validate_onnx(model), "opset-per-channel")
    assert f.severity == "info" and "opset 11" in f.message


def test_missing_and_duplicate_node_names(tmp_path, rng):
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    m (float[N,3,4,4] x) => (float[N,2,4,4] y) {
      a = Conv(x, W)
      b = Relu(a)
      c = Conv(b, W2)
      y = Relu(c)
    }""", W=weights(rng, 2, 3, 1, 1), W2=weights(rng, 2, 2, 1, 1))
    model.graph.node[0].name = model.graph.node[2].name = "conv"
    findings = validate_onnx(model)
    assert find(findings, "duplicate-node-name").node == "conv"
    assert "2 of 4 nodes have no name" in find(findings, "unnamed-nodes").message
    res = quantize(model, [{"x": rng.normal(0, 1, (1, 3, 4, 4)).astype(F32)}], QuantConfig(), output_dir=tmp_path)
    assert len(res.plan.nodes) == 4  # every node got its own name


def test_shared_weight(rng):
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    m (float[N,2,4,4] x) => (float[N,2,4,4] y) {
      a = Conv(x, W)
      y = Conv(a, W)
    }""", W=weights(rng, 2, 2, 1, 1))
    f = find(validate_onnx(model), "shared-weight")
    assert f.severity == "warning" and "'W'" in f.message and "2 nodes" in f.message


def test_constant_node_weights(rng):
    model = onnx.parser.parse_model(CONV.replace("Conv(", "Conv <pads=[1,1,1,1]> ("))
    model.graph.node.insert(0, helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(weights(rng, 2, 3, 3, 3))))
    f = find(validate_onnx(model), "constant-node-weights")
    assert f.severity == "info" and "1 tensors" in f.message


def test_dynamic_dimensions(rng):
    model = parse(CONV.replace("float[N,3,4,4] x", "float[N,3,H,W] x").replace("float[N,2,4,4] y", "float[N,2,H,W] y"),
                  W=weights(rng, 2, 3, 1, 1))
    f = find(validate_onnx(model), "dynamic-dims")
    assert f.severity == "warning" and f.node == "x" and "[0, 2, 3]" in f.message


def if_model(rng) -> onnx.ModelProto:
    """Conv, then an If whose then-branch holds another Conv (weights read from the outer scope)."""
    shape = ["N", 2, 4, 4]
    then = helper.make_graph([helper.make_node("Conv", ["c", "W1"], ["t"], name="inner_conv")], "then_g", [],
                             [helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, shape)])
    other = helper.make_graph([helper.make_node("Relu", ["c"], ["e"], name="inner_relu")], "else_g", [],
                              [helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, shape)])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W0"], ["c"], name="outer_conv"),
         helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then, else_branch=other)],
        "cf", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 4, 4]),
               helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(weights(rng, 2, 3, 1, 1), "W0"), numpy_helper.from_array(weights(rng, 2, 2, 1, 1), "W1")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def test_control_flow_is_named_and_quantized_unless_off(tmp_path, rng):
    model = if_model(rng)
    found = [f for f in validate_onnx(model) if f.code == "control-flow"]
    assert {f.node for f in found} == {"branch/then_branch", "branch/else_branch"}
    assert all(f.severity == "info" and "never taken stays in float" in f.message for f in found)
    data = [{"x": rng.normal(0, 1, (1, 3, 4, 4)).astype(F32), "cond": np.array(True)} for _ in range(16)]
    x = rng.normal(0, 1, (2, 3, 4, 4)).astype(F32)
    for on in (True, False):
        res = quantize(model, data, QuantConfig(quantize_subgraphs=on), output_dir=tmp_path / str(on))
        subs = {(s["node"], s["subgraph"]) for s in res.report["summary"]["float_subgraphs"]}
        assert "W0" in res.plan.tensors and ("W1" in res.plan.tensors) == on  # the inner Conv: quantized when on
        # on: the else-branch (a Relu, never taken by the data) quantizes only its captured, calibrated input c
        assert subs == (set() if on else {("branch", "then_branch"), ("branch", "else_branch")})
        for cond in (True, False):
            f, q = run(model, {"x": x, "cond": np.array(cond)})[0], run(res.model, {"x": x, "cond": np.array(cond)})[0]
            assert (f * q).sum() / np.linalg.norm(f) / np.linalg.norm(q) > 0.99


def test_custom_domain_op(rng):
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
    m (float[N,3,4,4] x) => (float[N,2,4,4] y) {
      c = Conv(x, W)
      y = com.microsoft.Gelu(c)
    }""", W=weights(rng, 2, 3, 1, 1))
    findings = validate_onnx(model)
    f = find(findings, "custom-domain")
    assert f.severity == "warning" and "com.microsoft::Gelu" in f.message
    assert "ort-load" not in codes(findings)  # ONNX Runtime implements it


def test_model_onnx_runtime_cannot_load_is_an_error(rng):
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17, "my.ops" : 1]>
    m (float[N,3,4,4] x) => (float[N,3,4,4] y) {
      y = my.ops.Foo(x)
    }""")
    findings = validate_onnx(model)
    assert find(findings, "ort-load").severity == "error" and "--custom-op-library" in find(findings, "ort-load").fix
    # no "custom-domain" warning beside it ("keep them; the rest is quantized" while ORT cannot load the model)
    assert "custom-domain" not in codes(findings, "warning") and "nothing-to-quantize" in codes(findings, "warning")


def test_ops_without_rule(rng):
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    m (float[5,2,3] x) => (float[5,2,4] y, float[5,2,4] z) {
      y, h = LSTM <hidden_size=4> (x, W, R)
      z = Cos(y)
    }""", W=weights(rng, 1, 16, 3), R=weights(rng, 1, 16, 4))
    model.graph.output[0].type.tensor_type.shape.Clear()
    model.graph.output.pop()
    model.graph.output.append(helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, None))
    findings = validate_onnx(model)
    by_op = {f.message.split()[1]: f for f in findings if f.code == "no-rule"}
    assert by_op["LSTM"].severity == "warning" and "carry weights" in by_op["LSTM"].message
    assert by_op["Cos"].severity == "info"


def test_already_quantized_is_an_error(tmp_path, rng, capsys):
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    m (float[N,4] x) => (float[N,4] y) {
      q = QuantizeLinear(x, s, z)
      y = DequantizeLinear(q, s, z)
    }""", s=np.array(0.1, F32), z=np.array(0, np.uint8))
    f = find(validate_onnx(model), "already-quantized")
    assert f.severity == "error" and "1 QuantizeLinear" in f.message and "float model" in f.fix
    out = tmp_path / "v.json"
    assert main(["validate", save(model, tmp_path / "q.onnx"), "--json", str(out)]) == EXIT_CHECK_FAILED
    printed = capsys.readouterr().out
    assert "ERROR" in printed and "already-quantized" in printed and "FAILED" in printed
    doc = json.loads(out.read_text())
    assert doc["passed"] is False and doc["summary"]["errors"] == 1
    assert {"severity", "code", "node", "message", "fix"} == set(doc["findings"][0])
    # quantize refuses it with the same message and fix
    calib = tmp_path / "calib"
    calib.mkdir()
    np.save(calib / "0.npy", np.ones((1, 4), F32))
    assert main(["quantize", str(tmp_path / "q.onnx"), "--calib", str(calib), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "already quantized" in err and "fix: quantize the float model" in err


def test_external_data_model(tmp_path, rng):
    model = parse(CONV, W=weights(rng, 2, 3, 1, 1))
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    f = find(validate_onnx(path), "external-data")
    assert f.severity == "info" and "1 tensors in external data" in f.message


def test_huge_constant_in_the_data_path(rng):
    mask = np.zeros((1, 3, 1, 1), F32)
    mask[0, 2] = np.finfo(np.float32).min
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    m (float[N,3,4,4] x) => (float[N,2,4,4] y) {
      a = Add(x, M)
      y = Conv(a, W)
    }""", M=mask, W=weights(rng, 2, 3, 1, 1))
    f = find(validate_onnx(model), "huge-constant")
    assert f.severity == "warning" and "'M'" in f.message and "clamp" in f.fix


def test_recognised_patterns_are_listed(rng):
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    m (float[N,3,4,4] x) => (float[N,2,4,4] y) {
      c = Conv(x, W)
      s = Sigmoid(c)
      y = Mul(c, s)
    }""", W=weights(rng, 2, 3, 1, 1))
    ort_cpu = find(validate_onnx(model), "pattern")
    assert "1 SiLU block(s)" in ort_cpu.message and "ort-cpu" in ort_cpu.message
    assert "pattern" not in codes(validate_onnx(model, "tensorrt"))  # fused into the Conv there, not a block


# --- PyTorch side (AIMET ModelValidator's examples) ---------------------------------------------------

class ReusedRelu(nn.Module):
    def __init__(self, fixed: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 4, 3)
        self.relu2 = nn.ReLU() if fixed else self.relu1

    def forward(self, x):
        return self.relu2(self.conv2(self.relu1(self.conv1(x))))


class FunctionalLinear(nn.Module):
    def __init__(self, fixed: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(8, 6)
        self.fixed = fixed
        if fixed:
            self.fc2 = nn.Linear(6, 3)
            self.relu = nn.ReLU()
        else:
            self.weight = nn.Parameter(torch.randn(3, 6))
            self.bias = nn.Parameter(torch.zeros(3))

    def forward(self, x):
        x = self.fc1(x)
        if self.fixed:
            return self.fc2(self.relu(x))
        return F.linear(F.relu(x), self.weight, self.bias)


def test_reused_relu1_is_reported_by_name():
    findings = validate_torch(ReusedRelu(), torch.zeros(1, 3, 8, 8))
    f = find(findings, "reused-module")
    assert f.severity == "error" and f.node == "relu1" and "2 times" in f.message


def test_functional_linear_is_reported():
    findings = validate_torch(FunctionalLinear(), torch.zeros(2, 8))
    f = find(findings, "functional-weighted-op")
    assert f.severity == "error" and "linear()" in f.message and "weight, bias" in f.message and "nn.Linear" in f.fix
    assert "relu()" in find(findings, "functional-op").message


@pytest.mark.parametrize("model,shape", [(ReusedRelu, (1, 3, 8, 8)), (FunctionalLinear, (2, 8))])
def test_fixed_versions_pass(model, shape):
    findings = validate_torch(model(fixed=True), torch.zeros(shape))
    assert not codes(findings, "error") and not codes(findings, "warning"), format_table(findings)


class MatmulInBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Module()
        self.block.w = nn.Parameter(torch.randn(4, 4))
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent control flow: torch.fx cannot trace this
            x = x * 0
        return self.out(torch.matmul(x, self.block.w))


def test_functional_matmul_found_from_export_scopes_when_fx_cannot_trace():
    findings = validate_torch(MatmulInBlock(), torch.ones(2, 4))
    f = find(findings, "functional-weighted-op")
    assert f.node.startswith("<top level> (/MatMul") and "MatMul" in f.message


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_onnx_nodes_map_back_to_module_paths(tmp_path, exporter):
    from converter import export_torch

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
            self.relu1 = nn.ReLU()
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.relu1(self.head(self.relu1(self.features(x))))

    net = Net().eval()
    model = export_torch(net, torch.zeros(1, 3, 8, 8), tmp_path / "net.onnx", simplify=False, exporter=exporter)
    mapping = onnx_module_map(model, net)
    by_op = {}
    for node in model.graph.node:
        by_op.setdefault(node.op_type, []).append(mapping.get(node.name))
    assert by_op["Conv"] == ["features.0", "head"]
    if exporter == "torchscript":
        assert by_op["Relu"] == ["features.1", "relu1", "relu1"]  # /relu1_1/Relu is the second call of relu1
    else:  # the dynamo exporter's optimizer fuses ReLU(ReLU(x)) into one node, named after the outer module
        assert by_op["Relu"] == ["relu1", "relu1"]
        assert [n.name for n in model.graph.node if n.op_type == "Relu"] == ["/relu1/Relu", "/relu1/Relu_1"]


def test_cli_validates_a_module_spec(tmp_path, capsys):
    src = tmp_path / "nets.py"
    src.write_text(textwrap.dedent("""
        import torch.nn as nn

        class Net(nn.Module):
            def __init__(self, fixed):
                super().__init__()
                self.conv = nn.Conv2d(3, 4, 3)
                self.relu1 = nn.ReLU()
                self.relu2 = nn.ReLU() if fixed else self.relu1
                self.conv2 = nn.Conv2d(4, 4, 3)

            def forward(self, x):
                return self.relu2(self.conv2(self.relu1(self.conv(x))))

        def broken():
            return Net(False)

        def fixed():
            return Net(True)
    """))
    assert main(["validate", f"{src}:broken", "--input-shape", "1,3,8,8"]) == EXIT_CHECK_FAILED
    out = capsys.readouterr().out
    assert "reused-module" in out and "relu1" in out
    assert main(["validate", f"{src}:fixed", "--input-shape", "1,3,8,8"]) == 0
    assert "PASSED" in capsys.readouterr().out
    assert main(["validate", f"{src}:fixed"]) == 2  # a module needs --input-shape


def test_validate_lists_blocks_and_a_decomposed_chain_no_matcher_took(rng):
    """A jax2tf-style LayerNorm is listed as a block; a GELU-looking chain with the wrong constant (0.3 for
    0.044715) is named as an unrecognised chain, with its ops, and flagged (it gets Q/DQ op by op)."""
    import math

    consts = dict(W1=rng.normal(0, 0.5, (16, 16)).astype(np.float32), W2=rng.normal(0, 0.5, (16, 8)).astype(np.float32),
                  axes=np.array([-1], np.int64), inv_n=np.array(1 / 16, np.float32), eps=np.array(1e-6, np.float32),
                  zero=np.array(0, np.float32), c0=np.array(math.sqrt(2 / math.pi), np.float32),
                  c1=np.array(0.3, np.float32), one=np.array(1, np.float32), half=np.array(0.5, np.float32),
                  gamma=np.ones(16, np.float32), beta=np.zeros(16, np.float32))
    model = parse("""
    <ir_version: 8, opset_import: ["" : 13]>
    m (float[N,16] x) => (float[N,8] y) {
      h = MatMul(x, W1)
      s1 = ReduceSum(h, axes)
      m = Mul(s1, inv_n)
      d = Sub(h, m)
      p = Mul(d, d)
      s2 = ReduceSum(p, axes)
      v = Mul(s2, inv_n)
      ve = Max(v, eps)
      sq = Sqrt(ve)
      r = Reciprocal(sq)
      n0 = Mul(d, r)
      g = Mul(n0, gamma)
      z = Add(g, beta)
      cu = Pow(z, c3)
      c2 = Mul(cu, c1)
      a = Add(z, c2)
      b = Mul(a, c0)
      t = Tanh(b)
      pp = Add(t, one)
      q = Mul(pp, half)
      u = Mul(z, q)
      y = MatMul(u, W2)
    }""", c3=np.array(3, np.float32), **consts)
    findings = validate_onnx(model)
    block = find(findings, "pattern")
    assert "1 LayerNorm block(s)" in block.message and "h -> z (12 nodes)" in block.message
    chain = find(findings, "unrecognised-chain")
    assert chain.severity == "warning" and "Tanh" in chain.message and "Mul" in chain.message
    assert "activation" in chain.message and "get Q/DQ op by op" in chain.message
