"""Build calib_data/digits/: a real calibration set for models/digits_cnn.py.

The first 64 *training* images of scikit-learn's bundled handwritten digits
(``sklearn.datasets.load_digits()``, BSD-3-Clause, shipped in the scikit-learn
wheel), each saved as ``NNN.npy``: float32 [1, 8, 8], x = pixel / 16, i.e. the
exact input the digits CNN expects for one sample (batch dimension is added by
the reader). Only the .npy files are written (labels are not needed for
calibration; they are ``load_digits().target[:64]``).

Usage: python calib_data/make_digits.py [--out DIR] [--count N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

N_TRAIN = 1200  # same fixed split as models/digits_cnn.py


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "digits"))
    ap.add_argument("--count", type=int, default=64)
    args = ap.parse_args(argv)
    if not 0 < args.count <= N_TRAIN:
        raise SystemExit(f"--count must be in 1..{N_TRAIN}")

    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.npy"):
        old.unlink()
    for i in range(args.count):
        np.save(out / f"{i:03d}.npy", np.ascontiguousarray(x[i]))
    print(f"wrote {args.count} samples float32 {tuple(x[0].shape)} to {out}")


if __name__ == "__main__":
    main()
