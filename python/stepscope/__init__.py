"""stepscope: on-device classification metrics and sync-free training-step timing for PyTorch.

    import stepscope
    metrics = stepscope.ClassificationMetrics("multiclass", num_classes=10, top_k=(1, 5))
    metrics.update(logits, labels)      # one kernel, no host sync
    print(metrics.compute())            # dict of tensors

    with stepscope.Monitor(model, optimizer) as mon:   # phase timing hooks, no host syncs
        ...                                            # the training loop, unchanged
    print(mon.summary())                # data/forward/loss/backward/other/optimizer per step
    mon.save("run.json"); mon.export_trace("run.trace.json.gz")   # see stepscope.export

The tensor kernels are torch.ops.stepscope.* ops (CPU, CUDA and Meta implementations); the
native classes live in stepscope._C.
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C, export, nvtx
from .export import SavedRun, load, log_tensorboard, plot
from .metrics import ClassificationMetrics
from .monitor import Monitor

__version__ = "0.1.0"


def build_info() -> dict:
    """What this build was compiled with.

    Returns a dict with ``torch_version`` (the torch compiled against), ``cuda`` (the CUDA
    toolkit version, or None for a CPU-only build), ``cuda_archs`` (list of the
    TORCH_CUDA_ARCH_LIST entries the kernels were built for) and ``nvtx`` (bool).
    """
    return _C.build_info()


__all__ = ["ClassificationMetrics", "Monitor", "SavedRun", "build_info", "export", "load", "log_tensorboard",
           "nvtx", "plot", "__version__"]
