"""Which model an encodings file, a QDQ model or a ``<name>.prepared.onnx`` belongs to (SHA-256 binding).

``quantize`` records in ``<name>.report.json`` (key ``binding``) the SHA-256 of every file it read or wrote:
the float model it was given (``float_model``; none for a ModelProto or a torch module, which have no file), the
``<name>.prepared.onnx`` it wrote when a pass changed the float model (``prepared_model``, else null), the
encodings file and the QDQ model. The hashes are of the file bytes (``sha256sum`` gives the same; a model with
external data: the ``.onnx`` file only).

The encodings file itself carries no hash: the AIMET formats (0.6.1, 1.0.0, 2.0.0) stay exactly what AIMET and
QNN read. The report beside it is the binding: ``X.encodings`` -> ``X.report.json``, ``X.qdq.onnx`` ->
``X.report.json``. A check applies only when that report exists, was written by quantize and records the very
file being checked (its hash matches): encodings from another tool, or moved away from their report, are
applied unchecked (a debug log says so).

Checks (each a :class:`~converter.errors.UserError` naming the right file):

* :func:`check_encodings_model`: ``apply-encodings`` of encodings to a model they were not made for (the
  stale ``prepared.onnx`` of an earlier ``--cle`` run, the original model when the encodings need the
  prepared one, any other model);
* :func:`check_float_for_qdq`: ``verify`` of a QDQ model against a float model it was not made from (the
  original float model and the prepared one both pass: their outputs agree);
* :func:`check_prepared_current`: a ``<name>.prepared.onnx`` that the last quantize run into its folder did not
  write (``verify``, ``analyze``, ``apply-encodings``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from .errors import EncodingsError, ModelError
from .options import ENCODINGS_SUFFIX, FLOAT_SUFFIX, QDQ_SUFFIX, REPORT_SUFFIX

log = logging.getLogger("converter")

SHORT = 12  # hex digits of a hash shown in messages


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_entry(path: str | os.PathLike | None) -> dict[str, str] | None:
    """``{"path", "sha256"}`` of an existing file, None for anything else (a ModelProto, a deleted temp file)."""
    if not isinstance(path, (str, os.PathLike)) or not Path(path).is_file():
        return None
    return {"path": str(path), "sha256": sha256_file(path)}


def _stem(path: Path) -> str | None:
    for suffix in (QDQ_SUFFIX, ENCODINGS_SUFFIX, FLOAT_SUFFIX):
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            return path.name[:-len(suffix)]
    return None


def sibling_report(path: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """The quantize report beside ``X.qdq.onnx`` / ``X.encodings`` / ``X.prepared.onnx`` when it exists, was
    written by quantize and has a ``binding``; else None."""
    if not isinstance(path, (str, os.PathLike)):
        return None
    path = Path(path)
    stem = _stem(path)
    if stem is None:
        return None
    report = path.parent / f"{stem}{REPORT_SUFFIX}"
    try:
        doc = json.loads(report.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or "converter_version" not in doc or not isinstance(doc.get("binding"), dict):
        return None
    return report, doc


def _short(sha: str) -> str:
    return f"sha256 {sha[:SHORT]}"


def recording_report(path: str | os.PathLike, key: str) -> tuple[Path, dict[str, Any]] | None:
    """The quantize report beside ``path`` (:func:`sibling_report`) when its ``binding[key]`` records this very file
    (same SHA-256); else None, with a debug log when a report is there but records another file."""
    found = sibling_report(path)
    if found is None:
        return None
    report, doc = found
    if (doc["binding"].get(key) or {}).get("sha256") != sha256_file(path):
        log.debug("%s does not record %s (its hash differs): no model check", report, path)
        return None
    return found


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def check_prepared_current(path: Any, what: str = "model") -> None:
    """``path`` named ``<name>.prepared.onnx``: the report beside it must record it (same hash). A prepared model
    left from an earlier ``--cle``/SmoothQuant run, which the last quantize run into that folder did not write,
    is refused: its weights belong to encodings that no longer exist."""
    if not isinstance(path, (str, os.PathLike)) or not str(path).endswith(FLOAT_SUFFIX) or not Path(path).is_file():
        return
    found = sibling_report(path)
    if found is None:
        return
    report, doc = found
    prepared = doc["binding"].get("prepared_model")
    sha = sha256_file(path)
    if prepared and prepared.get("sha256") == sha:
        return
    float_entry = doc["binding"].get("float_model") or {}
    original = float_entry.get("path") or doc.get("model", {}).get("source")
    why = ("wrote no prepared model (no pass changed the float model)" if not prepared else
           f"wrote another one ({_short(prepared['sha256'])}; this file has {_short(sha)})")
    raise ModelError(f"{path} is stale: the last quantize run into {report.parent} ({report.name}) {why}; this "
                     f"{what} is left from an earlier run and does not belong to its outputs",
                     (f"use the float model {original}" if original else "use the original float model")
                     + f", or re-run quantize; delete {path}")


def check_encodings_model(model: Any, encodings: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """``apply-encodings``: ``model`` must be the float model the encodings were computed for (the prepared
    model when quantize wrote one), as the report beside the encodings records it. Returns that report (path,
    contents), None where none records the encodings."""
    found = recording_report(encodings, "encodings")
    if found is None:
        log.debug("no quantize report beside %s records it: the encodings are applied without a model check",
                  encodings)
        return None
    report, doc = found
    binding = doc["binding"]
    if not isinstance(model, (str, os.PathLike)):
        log.debug("the model is not a file: no check against %s", report)
        return found
    check_prepared_current(model)
    needed = binding.get("prepared_model") or binding.get("float_model")
    if not needed or not needed.get("sha256"):
        return found
    sha = sha256_file(model)
    if sha == needed["sha256"]:
        return found
    original = binding.get("float_model") or {}
    made_for = f"these encodings ({encodings}) were made for {needed['path']} ({_short(needed['sha256'])})"
    if binding.get("prepared_model") and sha == original.get("sha256"):
        changed = ", ".join(k for k in ("smoothquant", "cle", "rotation", "adaround", "bias_correction") if doc.get(k))
        raise EncodingsError(f"{made_for}; {model} is the original float model, which {changed or 'a pass'} "
                             "changed: the encodings name the changed model's tensors and weights",
                             f"pass {needed['path']} (the <name>{FLOAT_SUFFIX} quantize wrote)")
    raise EncodingsError(f"{made_for}; {model} differs ({_short(sha)})",
                         f"pass {needed['path']}" + ("" if _same_file(needed["path"], model) else
                                                     f", or re-run quantize for {model}"))


def check_float_for_qdq(float_model: Any, quant_model: Any) -> None:
    """``verify``: when the report beside the QDQ model records it, the float model must be the one it was made
    from, or the prepared model quantize wrote (their outputs agree)."""
    if not isinstance(float_model, (str, os.PathLike)) or not isinstance(quant_model, (str, os.PathLike)):
        return
    check_prepared_current(float_model, "float model")
    found = recording_report(quant_model, "qdq_model")
    if found is None:
        return
    report, doc = found
    binding = doc["binding"]
    accepted = [e for e in (binding.get("float_model"), binding.get("prepared_model")) if e and e.get("sha256")]
    if not accepted:
        return
    sha = sha256_file(float_model)
    if any(sha == e["sha256"] for e in accepted):
        return
    names = " or ".join(f"{e['path']} ({_short(e['sha256'])})" for e in accepted)
    raise ModelError(f"{quant_model} was quantized from {names} ({report.name}); the float model {float_model} "
                     f"differs ({_short(sha)})", f"verify against {accepted[0]['path']}")
