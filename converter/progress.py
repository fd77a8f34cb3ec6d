"""Progress bars: one rule for every long step (calibration, sensitivity, search, verify, analyze, batch).

:class:`tqdm` is tqdm's bar with the tool's rule: shown only where stderr is a terminal (tqdm's
``disable=None``), never under ``-q`` (the ``converter`` logger set above INFO), and never when a
caller passes ``disable=True``. Modules import ``from converter.progress import tqdm`` instead of tqdm's.
"""

from __future__ import annotations

import logging

from tqdm import tqdm as _tqdm

log = logging.getLogger("converter")


def quiet() -> bool:
    """-q / --quiet (or a library user) set the package logger above INFO: no bars then."""
    return log.level > logging.INFO


class tqdm(_tqdm):  # noqa: N801 - a drop-in for tqdm.tqdm
    def __init__(self, *args, **kwargs):
        if quiet():
            kwargs["disable"] = True
        elif kwargs.get("disable", False) is False:
            kwargs["disable"] = None  # only on a terminal
        super().__init__(*args, **kwargs)
