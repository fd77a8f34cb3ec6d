"""Build calib_data/photos/ from real colour photographs shipped in PyPI packages.

Sources (nothing is downloaded; the images are read from the installed
packages):

* scikit-image ``skimage.data``: the photographs whose docstrings state a
  public-domain / CC0 release (astronaut, chelsea, coffee, rocket,
  hubble_deep_field, retina).
  Skipped: colorwheel (synthetic), immunohistochemistry (only "no known
  copyright restrictions", no licence grant), stereo_motorcycle (Middlebury
  2014, no licence stated).
* scikit-learn ``sklearn.datasets.load_sample_images()``: china.jpg and
  flower.jpg, CC BY 2.0 per sklearn/datasets/images/README.txt (redistribution
  allowed with attribution and a note of changes; see SOURCES.md).

Each image is resized (PIL bilinear) so its shorter side is 256 px and saved
as JPEG quality 90. SOURCES.md is written next to the images.

Usage: python calib_data/make_photos.py [--out DIR]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image

SHORT_SIDE = 256
JPEG_QUALITY = 90

# name -> (skimage.data function, license as stated in its docstring,
#          phrase that must appear in the docstring, description)
SKIMAGE_PHOTOS = {
    "astronaut": (
        "astronaut",
        "Public domain (\"No known copyright restrictions, released into the "
        "public domain.\"; NASA Great Images database)",
        "public domain",
        "Astronaut Eileen Collins (NASA)",
    ),
    "chelsea": (
        "chelsea",
        "CC0 (\"No copyright restrictions. CC0 by the photographer "
        "(Stefan van der Walt).\")",
        "CC0",
        "Chelsea the cat",
    ),
    "coffee": (
        "coffee",
        "CC0 (\"No copyright restrictions. CC0 by the photographer "
        "(Rachel Michetti).\"; courtesy of Pikolo Espresso Bar)",
        "CC0",
        "Coffee cup",
    ),
    "rocket": (
        "rocket",
        "Public domain (captured by SpaceX and released in the public domain)",
        "public domain",
        "Launch of DSCOVR on Falcon 9 (SpaceX)",
    ),
    "hubble_deep_field": (
        "hubble_deep_field",
        "Public domain (captured by NASA, \"may be freely used in the public "
        "domain\"; HubbleSite)",
        "public domain",
        "Hubble eXtreme Deep Field (NASA)",
    ),
    "retina": (
        "retina",
        "CC0 1.0 (\"Creative Commons CC0 1.0 Universal Public Domain "
        "Dedication\"; Wikimedia Commons, Mikael Haggstrom)",
        "CC0",
        "Fundus photograph of a human retina",
    ),
}

SKLEARN_PHOTOS = {
    "china": (
        "china.jpg",
        "CC BY 2.0 (https://creativecommons.org/licenses/by/2.0/). "
        "Attribution as stated by scikit-learn: \"Some rights reserved by "
        "danielbuechele\", https://www.flickr.com/photos/danielbuechele/6061409035/ ; "
        "retrieved 21 Aug 2011 by Robert Layton",
        "Chinese temple",
    ),
    "flower": (
        "flower.jpg",
        "CC BY 2.0 (https://creativecommons.org/licenses/by/2.0/). "
        "Attribution as stated by scikit-learn: \"Some rights reserved by "
        "danielbuechele\" with source https://www.flickr.com/photos/vultilion/6056698931/ "
        "(Flickr user vultilion); retrieved 21 Aug 2011 by Robert Layton",
        "Flower",
    ),
}


def resize_short_side(img: Image.Image, short: int = SHORT_SIDE) -> Image.Image:
    w, h = img.size
    if w <= h:
        size = (short, round(h * short / w))
    else:
        size = (round(w * short / h), short)
    return img.resize(size, Image.BILINEAR)


def save(arr: np.ndarray, path: Path) -> tuple[int, int]:
    img = Image.fromarray(np.asarray(arr, dtype=np.uint8)).convert("RGB")
    img = resize_short_side(img)
    img.save(path, format="JPEG", quality=JPEG_QUALITY)
    return img.size


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "photos"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import skimage
    import skimage.data
    import sklearn
    from sklearn.datasets import load_sample_images

    rows = []
    for name, (func, lic, phrase, desc) in SKIMAGE_PHOTOS.items():
        fn = getattr(skimage.data, func)
        doc = " ".join((fn.__doc__ or "").split())
        if phrase.lower() not in doc.lower():
            raise SystemExit(f"skimage.data.{func}: licence statement changed "
                             f"({phrase!r} not in docstring); re-check before use")
        size = save(fn(), out / f"{name}.jpg")
        rows.append((f"{name}.jpg", size, f"scikit-image {skimage.__version__}, "
                     f"`skimage.data.{func}()`", desc, lic))

    readme = Path(sklearn.__file__).parent / "datasets" / "images" / "README.txt"
    readme_text = readme.read_text()
    if readme_text.count("creativecommons.org/licenses/by/2.0") < len(SKLEARN_PHOTOS):
        raise SystemExit(f"{readme}: licence statement changed; re-check before use")
    sample = load_sample_images()
    by_file = {os.path.basename(f): im for f, im in zip(sample.filenames, sample.images)}
    for name, (fname, lic, desc) in SKLEARN_PHOTOS.items():
        size = save(by_file[fname], out / f"{name}.jpg")
        rows.append((f"{name}.jpg", size, f"scikit-learn {sklearn.__version__}, "
                     f"`sklearn.datasets.load_sample_images()` ({fname})", desc, lic))

    lines = [
        "# Calibration photos: sources and licences",
        "",
        "Generated by `calib_data/make_photos.py` from images shipped inside the",
        "PyPI packages scikit-image and scikit-learn (nothing downloaded).",
        f"Modifications: resized (PIL bilinear) so the shorter side is {SHORT_SIDE} px,",
        f"converted to RGB and re-encoded as JPEG quality {JPEG_QUALITY}.",
        "Licences are quoted as stated by the originating package (skimage.data",
        "function docstrings; sklearn/datasets/images/README.txt).",
        "",
        "| File | Size (WxH) | Origin | Content | Licence (as stated by the package) |",
        "|---|---|---|---|---|",
    ]
    for f, (w, h), origin, desc, lic in rows:
        lines.append(f"| {f} | {w}x{h} | {origin} | {desc} | {lic} |")
    lines += [
        "",
        "china.jpg and flower.jpg are CC BY 2.0: redistribution requires keeping the",
        "attribution above and noting the modifications (done here). All other files",
        "are public domain / CC0.",
        "",
        "Not included: skimage `colorwheel` (synthetic), `immunohistochemistry`",
        "(only \"no known copyright restrictions\", no licence grant),",
        "`stereo_motorcycle` (Middlebury 2014 stereo benchmark, no licence stated).",
        "",
        "`preprocess.yaml` in this folder is the EfficientNet-Lite0 preprocessing",
        "spec (written by hand, not by the script).",
        "",
    ]
    (out / "SOURCES.md").write_text("\n".join(lines))
    for f, (w, h), *_ in rows:
        print(f"{out / f}  {w}x{h}")
    print(f"{out / 'SOURCES.md'}")


if __name__ == "__main__":
    main()
