"""AIMET encodings JSON: schema of what we write, the offset convention, round trips, reading all
three versions, and malformed input."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest

from converter.errors import EncodingsError
from converter.quant.encoding import Encoding
from converter.quant.encodings_io import (
    EncodingsFile,
    FloatEncoding,
    dumps_encodings,
    loads_encodings,
    read_encodings,
)

# --- the format spec's examples ----------------------------------------------------------------

EXAMPLE_061 = {
    "version": "0.6.1",
    "activation_encodings": {
        "input": [{"bitwidth": 8, "dtype": "int", "is_symmetric": "False",
                   "max": 2.6086959838867188, "min": -2.109158515930176,
                   "offset": -114, "scale": 0.018501389771699905}]
    },
    "param_encodings": {
        "conv2.weight": [
            {"bitwidth": 8, "dtype": "int", "is_symmetric": "True",
             "max": 0.06318144500255585, "min": -0.06268782913684845,
             "offset": -127, "scale": 0.0004936049808748066},
            {"bitwidth": 8, "dtype": "int", "is_symmetric": "True",
             "max": 0.05589814856648445, "min": -0.05546144023537636,
             "offset": -127, "scale": 0.0004367042565718293}]
    },
    "quantizer_args": {"activation_bitwidth": 8, "dtype": "int", "is_symmetric": "True",
                       "param_bitwidth": 8, "per_channel_quantization": "True",
                       "quant_scheme": "post_training_tf_enhanced"},
}

EXAMPLE_100 = {
    "version": "1.0.0",
    "activation_encodings": [{"name": "input", "enc_type": "PER_TENSOR", "dtype": "INT",
                              "bw": 8, "is_sym": False,
                              "scale": [0.018501389771699905], "offset": [-114]}],
    "param_encodings": [{"name": "conv2.weight", "enc_type": "PER_CHANNEL", "dtype": "INT",
                         "bw": 8, "is_sym": True,
                         "scale": [0.0004936049808748066, 0.0004367042565718293],
                         "offset": [-127, -127]}],
    "quantizer_args": {"activation_bitwidth": 8, "param_bitwidth": 8, "dtype": "int",
                       "is_symmetric": True, "per_channel_quantization": True,
                       "quant_scheme": "post_training_tf_enhanced"},
}

EXAMPLE_200 = {
    "version": "2.0.0",
    "encodings": [{"name": "input", "output_dtype": "uint8",
                   "y_scale": 0.018501389771699905, "y_zero_point": 114},
                  {"name": "conv2.weight", "output_dtype": "int8",
                   "y_scale": [0.0004936049808748066, 0.0004367042565718293], "axis": 0}],
}

INPUT_SCALE = 0.018501389771699905
WEIGHT_SCALES = (0.0004936049808748066, 0.0004367042565718293)

# --- encodings used for writing ------------------------------------------------------------------

UINT8_ASYM = Encoding.from_aimet(8, False, [INPUT_SCALE], [-114])
INT8_SYM_PC = Encoding(8, True, True, (0.01, 0.02, 0.03), (0, 0, 0), axis=0)
UINT16_ASYM = Encoding(16, False, False, (1e-4,), (40000,))
ACTS = {"input": UINT8_ASYM, "act16": UINT16_ASYM, "logits": FloatEncoding()}
PARAMS = {"conv.weight": INT8_SYM_PC, "conv.bias": Encoding(32, True, True, (1e-6,), (0,))}
ARGS = {"activation_bitwidth": 8, "param_bitwidth": 8, "per_channel_quantization": True,
        "is_symmetric": False, "quant_scheme": "post_training_tf"}


def dump_json(version: str) -> dict:
    return json.loads(dumps_encodings(ACTS, PARAMS, ARGS, version))


def loads(doc: dict) -> EncodingsFile:
    return loads_encodings(json.dumps(doc), "model.encodings")


def f32(x: float) -> float:
    return float(np.float32(x))


# --- schema of what we write ----------------------------------------------------------------------


def test_v100_schema():
    doc = dump_json("1.0.0")
    assert list(doc) == ["version", "activation_encodings", "param_encodings", "quantizer_args"]
    assert doc["version"] == "1.0.0"
    assert [e["name"] for e in doc["activation_encodings"]] == ["input", "act16", "logits"]
    assert [e["name"] for e in doc["param_encodings"]] == ["conv.weight", "conv.bias"]
    entries = doc["activation_encodings"] + doc["param_encodings"]
    ints = [e for e in entries if e["dtype"] == "INT"]
    assert len(ints) == 4
    for e in ints:
        assert list(e) == ["name", "enc_type", "dtype", "bw", "is_sym", "scale", "offset"]
        assert type(e["bw"]) is int and type(e["is_sym"]) is bool
        assert all(type(s) is float for s in e["scale"])
        assert all(type(o) is int for o in e["offset"])
        assert len(e["scale"]) == len(e["offset"])
    by_name = {e["name"]: e for e in entries}
    assert by_name["input"]["enc_type"] == "PER_TENSOR" and by_name["input"]["is_sym"] is False
    assert by_name["conv.weight"]["enc_type"] == "PER_CHANNEL" and by_name["conv.weight"]["is_sym"] is True
    assert len(by_name["conv.weight"]["scale"]) == 3
    assert by_name["conv.bias"]["bw"] == 32
    assert by_name["logits"] == {"name": "logits", "enc_type": "PER_TENSOR", "dtype": "FLOAT", "bw": 16}
    assert doc["quantizer_args"] == ARGS
    assert doc["quantizer_args"]["per_channel_quantization"] is True


def test_v061_schema():
    doc = dump_json("0.6.1")
    assert list(doc) == ["version", "activation_encodings", "param_encodings", "quantizer_args"]
    assert doc["version"] == "0.6.1"
    assert list(doc["activation_encodings"]) == ["input", "act16", "logits"]
    assert list(doc["param_encodings"]) == ["conv.weight", "conv.bias"]
    assert doc["activation_encodings"]["logits"] == [{"bitwidth": 16, "dtype": "float"}]
    for name, entries in {**doc["activation_encodings"], **doc["param_encodings"]}.items():
        if name == "logits":
            continue
        for e in entries:
            assert list(e) == ["bitwidth", "dtype", "is_symmetric", "max", "min", "offset", "scale"]
            assert e["dtype"] == "int" and type(e["bitwidth"]) is int
            assert e["is_symmetric"] in ("True", "False")
            assert all(type(e[k]) is float for k in ("max", "min", "scale"))
            assert type(e["offset"]) is int
    assert len(doc["param_encodings"]["conv.weight"]) == 3
    assert len(doc["param_encodings"]["conv.bias"]) == 1
    assert doc["param_encodings"]["conv.weight"][0]["is_symmetric"] == "True"
    assert doc["activation_encodings"]["input"][0]["is_symmetric"] == "False"
    qa = doc["quantizer_args"]
    assert qa["per_channel_quantization"] == "True" and qa["is_symmetric"] == "False"
    assert qa["activation_bitwidth"] == 8 and qa["quant_scheme"] == "post_training_tf"


@pytest.mark.parametrize("version", ["1.0.0", "0.6.1"])
def test_output_is_deterministic_text(version):
    text = dumps_encodings(ACTS, PARAMS, ARGS, version)
    assert text.endswith("}\n")
    assert text == dumps_encodings(dict(ACTS), dict(PARAMS), dict(ARGS), version)
    doc = json.loads(text)
    assert list(doc) == ["version", "activation_encodings", "param_encodings", "quantizer_args"]
    lines = text.splitlines()
    tensors = len(doc["activation_encodings"]) + len(doc["param_encodings"])
    on_one_line = [ln for ln in lines if '"bitwidth"' in ln or '"bw"' in ln]  # one tensor per line
    assert len(on_one_line) == tensors and tensors >= 2


def test_empty_sections_are_valid_json():
    doc = json.loads(dumps_encodings({}, {}, {}, "1.0.0"))
    assert doc["activation_encodings"] == [] and doc["param_encodings"] == [] and doc["quantizer_args"] == {}
    assert json.loads(dumps_encodings({}, {}, {}, "0.6.1"))["param_encodings"] == {}


def test_default_version_is_100():
    assert json.loads(dumps_encodings(ACTS, PARAMS, ARGS))["version"] == "1.0.0"


def test_unsupported_write_version():
    with pytest.raises(EncodingsError) as exc:
        dumps_encodings(ACTS, PARAMS, ARGS, "3.0.0")
    assert "3.0.0" in exc.value.message
    assert "1.0.0" in exc.value.fix and "0.6.1" in exc.value.fix and "2.0.0" in exc.value.fix


def test_write_200_mirrors_quantize_linear():
    doc = json.loads(dumps_encodings(ACTS, PARAMS, ARGS, "2.0.0"))
    assert list(doc) == ["version", "encodings"] and doc["version"] == "2.0.0"
    by_name = {e["name"]: e for e in doc["encodings"]}
    inp = by_name["input"]
    assert inp["output_dtype"] == "uint8" and inp["y_zero_point"] == 114 and "axis" not in inp
    w = by_name["conv.weight"]
    assert w["output_dtype"] == "int8" and w["axis"] == 0 and len(w["y_scale"]) == 3
    assert "y_zero_point" not in w  # all zero: left out


def test_round_trip_200_bit_exact(tmp_path):
    acts = {f"a{i}": Encoding.from_aimet(8, False, [s], [-(i * 30)]) for i, s in enumerate(AWKWARD)}
    acts["a16"] = UINT16_ASYM
    acts["bias_pt"] = Encoding(32, True, True, (f32(3e-7),), (0,))  # per-tensor: read back as an activation
    acts["half"] = FloatEncoding(16)
    params = {"w_pc": Encoding(8, True, True, tuple(AWKWARD), (0,) * len(AWKWARD), axis=1),
              "bias": Encoding(32, True, True, (f32(1e-7), f32(2e-7)), (0, 0), axis=0)}
    path = tmp_path / "model.encodings"
    path.write_text(dumps_encodings(acts, params, {}, "2.0.0"))
    got = read_encodings(path)
    assert got.version == "2.0.0" and not got.axis_unknown
    assert got.activations == acts and got.params == params
    assert dumps_encodings(got.activations, got.params, {}, "2.0.0") == path.read_text()


# --- the offset convention --------------------------------------------------------------------------


def test_offset_uint8_asymmetric():
    assert UINT8_ASYM.signed is False and UINT8_ASYM.zero_point == (114,)
    e = dump_json("0.6.1")["activation_encodings"]["input"][0]
    assert e["offset"] == -114 == -UINT8_ASYM.zero_point[0]
    assert e["scale"] == INPUT_SCALE
    assert e["min"] == float(np.float32(-114) * np.float32(INPUT_SCALE))
    assert e["min"] == pytest.approx(-114 * INPUT_SCALE, rel=1e-6)
    assert e["max"] == pytest.approx((255 - 114) * INPUT_SCALE, rel=1e-6)
    # the spec's example numbers
    assert e["min"] == pytest.approx(-2.109158515930176, abs=1e-6)
    assert e["max"] == pytest.approx(2.6086959838867188, abs=1e-6)


def test_offset_int8_symmetric():
    enc = Encoding(8, True, True, (0.05,), (0,))
    text = dumps_encodings({}, {"w": enc}, {}, "1.0.0")
    entry = json.loads(text)["param_encodings"][0]
    assert entry["offset"] == [-128] and entry["is_sym"] is True
    back = loads_encodings(text).params["w"]
    assert back.signed and back.zero_point == (0,) and back == enc


def test_offset_int16_asymmetric():
    e = json.loads(dumps_encodings({"a": UINT16_ASYM}, {}, {}, "0.6.1"))["activation_encodings"]["a"][0]
    assert e["bitwidth"] == 16 and e["offset"] == -40000 and e["is_symmetric"] == "False"
    assert e["min"] == pytest.approx(-40000 * 1e-4, rel=1e-6)
    assert e["max"] == pytest.approx((65535 - 40000) * 1e-4, rel=1e-6)


def test_offset_signed_asymmetric_reads_back_as_equivalent_unsigned():
    int16 = Encoding(16, True, False, (0.002,), (-1000,))
    entry = json.loads(dumps_encodings({"a": int16}, {}, {}))["activation_encodings"][0]
    assert entry["offset"] == [1000 - 32768]
    back = loads_encodings(dumps_encodings({"a": int16}, {}, {})).activations["a"]
    assert (back.bitwidth, back.signed, back.zero_point) == (16, False, (31768,))
    q = np.array([-32768, -1000, 0, 32767], dtype=np.int16)
    q_unsigned = (q.astype(np.int32) + 32768).astype(np.uint16)
    np.testing.assert_array_equal(int16.dequantize(q), back.dequantize(q_unsigned))


# --- round trips -------------------------------------------------------------------------------------

AWKWARD = [float(np.float32(0.1)), f32(1 / 3), f32(1.4e-45), f32(1.17e-38), f32(1e36),
           float(np.nextafter(np.float32(1), np.float32(2))), f32(0.018501389771699905)]


@pytest.mark.parametrize("version", ["1.0.0", "0.6.1"])
def test_round_trip_bit_exact(version, tmp_path):
    acts = {f"a{i}": Encoding.from_aimet(8, False, [s], [-(i * 30)]) for i, s in enumerate(AWKWARD)}
    acts["a16"] = UINT16_ASYM
    acts["half"] = FloatEncoding(16)
    params = {
        "w_pc": Encoding(8, True, True, tuple(AWKWARD), (0,) * len(AWKWARD), axis=1),
        "w16": Encoding(16, True, True, (f32(0.1),), (0,)),
        "bias": Encoding(32, True, True, (f32(1e-7), f32(2e-7)), (0, 0), axis=0),
        "f32": FloatEncoding(32),
    }
    path = tmp_path / "model.encodings"
    path.write_text(dumps_encodings(acts, params, ARGS, version))
    got = read_encodings(path)
    assert got.version == version
    assert got.quantizer_args == ARGS
    assert got.axis_unknown == {"w_pc", "bias"}
    assert got.params["w_pc"].axis == 0  # placeholder
    got.params["w_pc"] = dataclasses.replace(got.params["w_pc"], axis=1)
    assert got.activations == acts
    assert got.params == params
    assert list(got.activations) == list(acts) and list(got.params) == list(params)
    for name, enc in acts.items():
        if isinstance(enc, Encoding):
            np.testing.assert_array_equal(got.activations[name].scale_array().view(np.uint32),
                                          enc.scale_array().view(np.uint32))
    # writing what was read gives the same text
    assert dumps_encodings(got.activations, got.params, got.quantizer_args, version) == path.read_text()


def test_range_beyond_float32_only_in_100():
    huge = {"h": Encoding(8, False, False, (f32(3.4e38),), (1,))}
    assert loads_encodings(dumps_encodings(huge, {}, {})).activations == huge
    with pytest.raises(EncodingsError, match="tensor 'h': range overflows float32") as exc:
        dumps_encodings(huge, {}, {}, "0.6.1")
    assert "1.0.0" in exc.value.fix


# --- reading the spec's examples ----------------------------------------------------------------------


def check_example(f: EncodingsFile, weight_axis_known: bool):
    inp = f.activations["input"]
    assert (inp.bitwidth, inp.signed, inp.symmetric) == (8, False, False)
    assert inp.scale == (INPUT_SCALE,) and inp.zero_point == (114,) and inp.axis is None
    w = f.params["conv2.weight"]
    assert (w.bitwidth, w.signed, w.symmetric) == (8, True, True)
    assert w.scale == WEIGHT_SCALES and w.zero_point == (0, 0) and w.axis == 0
    assert list(f.activations) == ["input"] and list(f.params) == ["conv2.weight"]
    assert f.axis_unknown == (set() if weight_axis_known else {"conv2.weight"})


def test_read_example_061():
    f = loads(EXAMPLE_061)
    assert f.version == "0.6.1"
    check_example(f, weight_axis_known=False)
    assert f.quantizer_args["per_channel_quantization"] is True
    assert f.quantizer_args["quant_scheme"] == "post_training_tf_enhanced"


def test_read_061_without_version():
    doc = {k: v for k, v in EXAMPLE_061.items() if k != "version"}
    f = loads(doc)
    assert f.version == "0.6.1"
    check_example(f, weight_axis_known=False)


def test_read_example_100():
    f = loads(EXAMPLE_100)
    assert f.version == "1.0.0"
    check_example(f, weight_axis_known=False)
    assert f.quantizer_args == EXAMPLE_100["quantizer_args"]


def test_read_example_200():
    f = loads(EXAMPLE_200)
    assert f.version == "2.0.0"
    check_example(f, weight_axis_known=True)
    assert f.quantizer_args == {}


def test_read_200_defaults_and_unknown_axis():
    doc = {"version": "2.0.0", "encodings": [
        {"name": "x", "output_dtype": "int8", "y_scale": 0.5},
        {"name": "y", "output_dtype": "int16", "y_scale": [0.5, 0.25], "y_zero_point": [3, -4]},
        {"name": "z", "output_dtype": "uint16", "y_scale": [0.5], "y_zero_point": [7], "axis": 1},
        {"name": "h", "output_dtype": "float16"},
    ]}
    f = loads(doc)
    assert f.activations == {"x": Encoding(8, True, True, (0.5,), (0,)), "h": FloatEncoding(16)}
    assert f.params == {"y": Encoding(16, True, False, (0.5, 0.25), (3, -4), axis=0),
                        "z": Encoding(16, False, False, (0.5,), (7,), axis=1)}
    assert f.axis_unknown == {"y"}


def test_read_float_entries():
    f061 = loads({"version": "0.6.1", "activation_encodings": {"t": [{"bitwidth": 16, "dtype": "float"}]},
                  "param_encodings": {}})
    f100 = loads({"version": "1.0.0", "activation_encodings": [],
                  "param_encodings": [{"name": "t", "enc_type": "PER_TENSOR", "dtype": "FLOAT", "bw": 32}]})
    assert f061.activations == {"t": FloatEncoding(16)} and f061.params == {}
    assert f100.params == {"t": FloatEncoding(32)} and f100.activations == {}


# --- malformed input ----------------------------------------------------------------------------------


def v100(**changes) -> dict:
    """The 1.0.0 example with the conv2.weight entry changed (None deletes a key)."""
    doc = copy.deepcopy(EXAMPLE_100)
    entry = doc["param_encodings"][0]
    for k, v in changes.items():
        entry.pop(k) if v is None else entry.__setitem__(k, v)
    return doc


def v061(**changes) -> dict:
    """The 0.6.1 example with the first channel of conv2.weight changed (None deletes a key)."""
    doc = copy.deepcopy(EXAMPLE_061)
    entry = doc["param_encodings"]["conv2.weight"][0]
    for k, v in changes.items():
        entry.pop(k) if v is None else entry.__setitem__(k, v)
    return doc


def v200(**changes) -> dict:
    """The 2.0.0 example with the conv2.weight entry changed (None deletes a key)."""
    doc = copy.deepcopy(EXAMPLE_200)
    entry = doc["encodings"][1]
    for k, v in changes.items():
        entry.pop(k) if v is None else entry.__setitem__(k, v)
    return doc


BAD = {
    # missing keys
    "100 missing bw": (v100(bw=None), "bw"),
    "100 missing offset": (v100(offset=None), "offset"),
    "100 missing is_sym": (v100(is_sym=None), "is_sym"),
    "061 missing scale": (v061(scale=None), "scale"),
    "061 missing is_symmetric": (v061(is_symmetric=None), "is_symmetric"),
    "200 missing output_dtype": (v200(output_dtype=None), "output_dtype"),
    "200 missing y_scale": (v200(y_scale=None), "y_scale"),
    # wrong types
    "100 bw string": (v100(bw="8"), "bw"),
    "100 scale string": (v100(scale=["0.1", 0.2]), "scale"),
    "100 offset fraction": (v100(offset=[-127.5, -127]), "offset"),
    "100 is_sym int": (v100(is_sym=1), "is_sym"),
    "061 is_symmetric yes": (v061(is_symmetric="yes"), "is_symmetric"),
    "061 scale bool": (v061(scale=True), "scale"),
    "200 axis string": (v200(axis="0"), "axis"),
    # inconsistent shapes
    "100 length mismatch": (v100(offset=[-127]), "offset"),
    "100 empty scale": (v100(scale=[], offset=[]), "scale"),
    "100 per-tensor with 2 scales": (v100(enc_type="PER_TENSOR"), "scale"),
    "061 channels disagree": (v061(bitwidth=16), "bitwidth"),
    "200 zero point count": (v200(y_zero_point=[0, 0, 0]), "y_zero_point"),
    # bad numbers
    "100 zero scale": (v100(scale=[0.0, 0.1]), "scale"),
    "061 negative scale": (v061(scale=-0.1), "scale"),
    "100 scale overflows float32": (v100(scale=[1e39, 0.1]), "scale"),
    "200 zero scale": (v200(y_scale=[0.1, 0]), "y_scale"),
    "061 positive offset": (v061(offset=5), "offset"),
    "100 offset below range": (v100(offset=[-256, -127]), "offset"),
    "200 zero point out of range": (v200(y_zero_point=[0, 128]), "y_zero_point"),
    # unsupported kinds
    "100 LPBQ": (v100(enc_type="LPBQ", block_size=64), "enc_type"),  # PER_BLOCK is read (test_block_weights.py)
    "100 per-block without size": (v100(enc_type="PER_BLOCK"), "block_size"),
    "100 3 bits": (v100(bw=3), "bw"),  # 4 bits is read (int4 weights)
    "100 asymmetric 32 bits": (v100(bw=32, is_sym=False), "bw"),
    "100 dtype": (v100(dtype="BF16"), "dtype"),
    "061 dtype": (v061(dtype="fixed"), "dtype"),
    "200 dtype": (v200(output_dtype="int2"), "output_dtype"),
    "200 block axis beyond the scale": (v200(block_size=32, axis=1), "y_scale"),
    "200 LPBQ": (v200(block_size=32, per_block_int_scale=[1, 2]), "per_block_int_scale"),
    # duplicate
    "100 duplicate name": ({**EXAMPLE_100, "param_encodings": EXAMPLE_100["param_encodings"] * 2}, "name"),
}


@pytest.mark.parametrize("doc, key", BAD.values(), ids=BAD.keys())
def test_malformed_entry(doc, key):
    with pytest.raises(EncodingsError) as exc:
        loads(doc)
    msg = exc.value.message
    assert msg.startswith("model.encodings: ")
    assert "'conv2.weight'" in msg and f"'{key}'" in msg
    assert exc.value.fix


def test_061_entry_not_a_list():
    doc = copy.deepcopy(EXAMPLE_061)
    doc["activation_encodings"]["input"] = doc["activation_encodings"]["input"][0]
    with pytest.raises(EncodingsError, match=r"model\.encodings: tensor 'input', key 'activation_encodings'"):
        loads(doc)


@pytest.mark.parametrize("text, needle", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"version": "3.0.0", "encodings": []}', "'3.0.0'"),
    ('{"version": 1.0}', "key 'version'"),
    ('{"quantizer_args": {}}', "unknown encodings version None"),
    ('{"version": "1.0.0", "param_encodings": {}}', "key 'param_encodings'"),
    ('{"version": "1.0.0", "param_encodings": [{"bw": 8}]}', "key 'name': missing"),
    ('{"version": "2.0.0"}', "key 'encodings': missing"),
])
def test_malformed_file(text, needle):
    with pytest.raises(EncodingsError) as exc:
        loads_encodings(text, "bad.json")
    assert exc.value.message.startswith("bad.json: ")
    assert needle in exc.value.message
    assert exc.value.fix


def test_unknown_version_fix_lists_supported():
    with pytest.raises(EncodingsError) as exc:
        loads_encodings('{"version": "0.5.0"}')
    assert all(v in exc.value.fix for v in ("0.6.1", "1.0.0", "2.0.0"))


def test_read_missing_file(tmp_path):
    path = tmp_path / "nope.encodings"
    with pytest.raises(EncodingsError) as exc:
        read_encodings(path)
    assert str(path) in exc.value.message and exc.value.fix


def test_read_file_error_names_path(tmp_path):
    path = tmp_path / "bad.encodings"
    path.write_text(json.dumps(v100(offset=[-127])))
    with pytest.raises(EncodingsError) as exc:
        read_encodings(path)
    assert exc.value.message.startswith(f"{path}: tensor 'conv2.weight', key 'offset'")
