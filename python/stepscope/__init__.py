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
native classes live in stepscope._C. Reading a saved run needs neither torch nor the extension
(stepscope.run, stepscope.report, stepscope.export, stepscope.diagnose, stepscope.compare;
stepscope.hardware, the peak FLOP/s table, neither): without torch this
package imports those alone, and the names that need torch raise an ImportError saying so.
"""

from typing import Any

from . import diagnose, export, hardware
from .compare import compare
from .run import SavedRun, load
from .export import log_tensorboard, plot

__version__ = "0.1.0"

try:
    import torch  # noqa: F401  (loads libtorch before the extension)
except ImportError as e:  # a reader of saved runs without torch
    _no_torch: "ImportError | None" = e
else:
    _no_torch = None
    from . import _C, distributed, nvtx, tune
    from .metrics import ClassificationMetrics
    from .regression import RegressionMetrics
    from .monitor import Monitor


def __getattr__(name: str) -> Any:
    # Only reached without torch: the names below were not imported.
    if name in ("_C", "distributed", "nvtx", "metrics", "monitor", "tune", "ClassificationMetrics", "Monitor",
                "regression", "RegressionMetrics"):
        raise ImportError(f"stepscope.{name} needs torch, which could not be imported ({_no_torch}); "
                          "saved runs are read without it (stepscope.load, stepscope.plot)") from _no_torch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_info() -> dict:
    """What this build was compiled with.

    Returns a dict with ``torch_version`` (the torch compiled against), ``cuda`` (the CUDA
    toolkit version, or None for a CPU-only build), ``cuda_archs`` (list of the
    TORCH_CUDA_ARCH_LIST entries the kernels were built for) and ``nvtx`` (bool).
    """
    from . import _C

    return _C.build_info()


__all__ = ["ClassificationMetrics", "Monitor", "RegressionMetrics", "SavedRun", "build_info", "compare", "diagnose",
           "distributed", "export", "hardware", "load", "log_tensorboard", "nvtx", "plot", "tune", "__version__"]
