"""ONNX Runtime behind motian's serving verbs: the session `motian export` checks its graph with
and `motian predict --backend onnx` serves from, and the one way a batch is fed to it.

onnxruntime is an optional extra (`pip install 'motian[onnx]'`): it is imported when a session
is made, so the rest of serving loads without it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import Tensor

from motian.errors import UserError

ONNX_FILE = "model.onnx"  # the graph in a serving directory
INT8_FILE = "model.int8.onnx"  # its int8 dynamic quantisation (`motian export --int8`)


def onnx_session(path: Path, threads: int = 0):
    """An onnxruntime CPU session (`threads=0`: onnxruntime's default, one per core)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("onnxruntime is not installed; pip install 'motian[onnx]'") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: the graph-optimiser notes are not for users
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_session(session, batch: dict[str, Tensor | np.ndarray]) -> dict[str, np.ndarray]:
    """Feed the inputs the graph declares, as int64; outputs by name."""
    feed = {i.name: np.asarray(batch[i.name], dtype=np.int64) for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed)))
