"""Regression metrics accumulated on the device in one op per update: MSE, RMSE, MAE, R², explained
variance, Pearson's r, max error and MAPE, per output and averaged."""

from __future__ import annotations

import datetime
import operator
import warnings
from typing import Any, Optional, Union

import torch

from . import _C
from ._metrics_config import check_tensors
from .metrics import ClassificationMetrics, _timeout_seconds, check_loaded_state, keep_float64

FIELDS = _C.REGRESSION_FIELDS  # float64 words of state per output (csrc/regression/regression.h)
_MAGIC = 0x5265_6772  # the fingerprint's first word: a regression state (not a classification one)


class RegressionMetrics(torch.nn.Module):
    """MSE, RMSE, MAE, R², explained variance, Pearson's r, max error and MAPE of a regressor, from one
    pass over each batch, in float64, on the predictions' device.

    Args:
        num_outputs: K. With 1, preds and target may have any (equal) shape, read flattened (as
            torchmetrics' MeanSquaredError reads them); with K > 1 they are ``[N, K]``.
        device, persistent, sync_on_compute, process_group, sync_timeout: as
            :class:`ClassificationMetrics`'s.

    Example:
        >>> m = RegressionMetrics()
        >>> m.update(torch.tensor([2.5, 0.0, 2.0, 8.0]), torch.tensor([3.0, -0.5, 2.0, 7.0]))
        >>> round(float(m.compute()["mse"]), 3)
        0.375

    The state is one float64 buffer, ``state`` (``num_outputs * 12`` words): per output the count,
    the means and centred second moments of the predictions, the targets and the errors, their
    co-moment, and the sums of the absolute and percentage errors. Blocks of the batch are merged
    by Chan et al.'s pairwise rule, so a target offset of 1e6 over 10^6 samples costs no digits
    (sums of squares would lose about twelve of them). Predictions may be float32, float16,
    bfloat16 or float64, targets floating or integer. A pair where either value is NaN or Inf is
    left out and counted in ``nonfinite``.

    ``update`` is one op and never synchronises with the host: on the CPU one kernel, on CUDA a
    handful of ATen launches (no kernel of its own yet). ``compute(check=True)`` reads the
    non-finite count once to warn; ``check=False`` reads nothing.

    Distributed: ``compute()`` is global by default, like ClassificationMetrics'. The states merge by
    the pairwise rule, not by a sum, so the ranks' states are gathered (one ``all_gather`` of
    ``world x 12K`` words) and merged, rather than ``all_reduce``\\ d; the first call (and any after
    the group changed) also compares the ranks' ``num_outputs`` with a two-word gather.

    Semantics: scikit-learn's ``multioutput="uniform_average"`` for the plain keys and
    ``"raw_values"`` for ``*_per_output``. R² and explained variance follow its ``force_finite``
    rule (a constant target scores 1 when the error term is 0 too, else 0) and are NaN under two
    samples, as Pearson's r is (scipy.stats.pearsonr, NaN for a constant input too, clipped to
    [-1, 1]). ``mape`` is torchmetrics' (|error| / max(|target|, 1.17e-6)); scikit-learn's
    ``mean_absolute_percentage_error`` clamps at float64's epsilon instead. ``max_error`` is the
    largest absolute error over every output (scikit-learn's takes one output only). With no
    sample counted, every score is NaN (torchmetrics: 0/0 NaN too, R² raises).
    """

    def __init__(
        self,
        num_outputs: int = 1,
        device: Union[str, torch.device, None] = None,
        persistent: bool = True,
        sync_on_compute: Optional[bool] = None,
        process_group: object = None,
        sync_timeout: Union[float, datetime.timedelta, None] = None,
    ) -> None:
        super().__init__()
        try:
            if isinstance(num_outputs, bool):
                raise TypeError
            num_outputs = operator.index(num_outputs)
        except TypeError:
            raise TypeError(f"stepscope: num_outputs must be an int; got {type(num_outputs).__name__} "
                            f"{num_outputs!r}") from None
        if num_outputs < 1:
            raise ValueError(f"stepscope: num_outputs must be >= 1; got {num_outputs}")
        if sync_on_compute not in (None, True, False):
            raise TypeError("stepscope: sync_on_compute must be None, True or False; "
                            f"got {sync_on_compute!r}")
        self._num_outputs = num_outputs
        self.sync_on_compute = sync_on_compute
        self.process_group = process_group
        self.sync_timeout = None if sync_timeout is None else _timeout_seconds("sync_timeout", sync_timeout)
        self._checked_group: Any = None  # the group whose num_outputs were last compared
        self._synced_in_place = False
        self._op = torch.ops.stepscope.regression_update.default
        self.state: torch.Tensor
        self.register_buffer("state", torch.zeros(num_outputs * FIELDS, dtype=torch.float64, device=device),
                             persistent=persistent)
        self._placed = device is not None

    @property
    def num_outputs(self) -> int:
        """K, fixed when the object is made (the state's size follows from it)."""
        return self._num_outputs

    # Distributed plumbing shared with ClassificationMetrics (both read the same attributes).
    _should_sync = ClassificationMetrics._should_sync
    _comm_device = ClassificationMetrics._comm_device

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_op", None)
        state["_checked_group"] = None
        state["process_group"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._op = torch.ops.stepscope.regression_update.default

    # Shared with ClassificationMetrics: a deep copy shares the original's process group; forward's
    # placing of the state and the batch's own state.
    __deepcopy__ = ClassificationMetrics.__deepcopy__
    _batch_state = ClassificationMetrics._batch_state

    def _apply(self, fn: Any, recurse: bool = True) -> "RegressionMetrics":
        out = super()._apply(keep_float64(fn), recurse)
        self._placed = True
        return out

    def _run(self, preds: Any, target: Any, state: torch.Tensor) -> None:
        try:
            self._op(preds, target, state, self._num_outputs)
        except (RuntimeError, NotImplementedError):
            check_tensors(preds, target)  # say it in stepscope's words when the dispatcher refused it
            raise

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Accumulate one batch. No host sync; raises before touching the state on bad input."""
        if self._placed:
            return self._run(preds, target, self._buffers["state"])
        check_tensors(preds, target)
        state = self.state.to(preds.device)
        self._run(preds, target, state)  # the state moves only once the call passed every check
        self.state = state
        self._placed = True

    def forward(self, preds: torch.Tensor, target: torch.Tensor) -> dict:
        """Accumulates the batch (as ``update``) and returns its own metrics (``compute()``'s keys for
        this batch alone; no host sync)."""
        state, batch = self._batch_state(preds, target)
        _C.regression_merge(state, batch)
        return _C.regression_compute(batch)

    def compute(self, check: bool = True, scalars: bool = False, timeout: Any = None) -> dict:
        """The metrics as a dict of float64 tensors on the state's device (``samples`` and
        ``nonfinite`` int64): ``mse``, ``rmse``, ``mae``, ``r2``, ``explained_variance``,
        ``pearson``, ``mape`` (averaged over the outputs), ``max_error`` (over all of them), and
        each of these as ``<key>_per_output`` [K]; ``samples`` and ``nonfinite`` (totals, and
        ``*_per_output``). ``scalars=True`` keeps the single-number entries. ``check=True`` warns
        (one host read) when pairs were left out as non-finite. Under torch.distributed (see
        ``sync_on_compute``) the metrics are those of every rank's data, the local state untouched;
        ``timeout`` is ClassificationMetrics.compute()'s."""
        state = self.state
        if self._should_sync():
            state = self._gathered(timeout, "RegressionMetrics.compute()")
        out = _C.regression_compute(state)
        if check:
            nonfinite = int(out["nonfinite"])
            if nonfinite:
                warnings.warn(f"stepscope: RegressionMetrics left out {nonfinite} (pred, target) pair(s) "
                              f"with a NaN or Inf value; the metrics are over the {int(out['samples'])} "
                              "finite ones", stacklevel=2)
        if scalars:
            out = {k: v for k, v in out.items() if not k.endswith("_per_output")}
        return out

    log_dict = ClassificationMetrics.log_dict  # compute(scalars=True), prefixed, counts as float64

    def reset(self) -> None:
        """Zero the state in place."""
        self.state.zero_()
        self._synced_in_place = False

    def sync(self, process_group: Any = None, timeout: Any = None) -> None:
        """Replace the state in place by every rank's merged together (one gather); ``compute()`` then
        does not gather again until ``reset()``."""
        merged = self._gathered(timeout, "RegressionMetrics.sync()", process_group)
        self.state.copy_(merged)
        self._synced_in_place = True

    def _gathered(self, timeout: Any, what: str, group: Any = None) -> torch.Tensor:
        """Every rank's state, merged in rank order (the same result on every rank)."""
        import torch.distributed as dist

        from .distributed import run_collective

        group = group if group is not None else self.process_group
        timeout = self.sync_timeout if timeout is None else _timeout_seconds("timeout", timeout)
        device = self.state.device if self._placed else self._comm_device()
        world = dist.get_world_size(group)
        key = group if group is not None else dist.group.WORLD
        if self._checked_group is not key:
            mine = torch.tensor([_MAGIC, self._num_outputs], dtype=torch.int64, device=device)
            rows = torch.empty(world * 2, dtype=torch.int64, device=device)
            run_collective(lambda a: dist.all_gather_into_tensor(rows, mine, group=group, async_op=a), group,
                           timeout, what)
            seen = [tuple(r) for r in rows.view(world, 2).tolist()]
            if any(r[0] != _MAGIC for r in seen) or len(set(seen)) > 1:
                each = ", ".join(f"{r[1] if r[0] == _MAGIC else 'not a RegressionMetrics'} on rank {i}"
                                 for i, r in enumerate(seen))
                raise ValueError(f"stepscope: {what}: the RegressionMetrics of the ranks differ, so "
                                 f"their states cannot be merged; num_outputs: {each} (ranks are numbered "
                                 "within the process group)")
            self._checked_group = key
        mine = self.state.to(device)
        rows = torch.empty(world * mine.numel(), dtype=torch.float64, device=device)
        run_collective(lambda a: dist.all_gather_into_tensor(rows, mine, group=group, async_op=a), group,
                       timeout, what)
        merged = torch.zeros_like(mine)
        _C.regression_merge(merged, rows.view(world, -1))
        return merged.to(self.state.device)

    # state_dict: nn.Module's, with num_outputs as extra state, checked before any tensor is copied.
    def get_extra_state(self) -> dict:
        return {"kind": "regression", "num_outputs": self._num_outputs}

    def set_extra_state(self, state: Any) -> None:
        if state != self.get_extra_state():
            raise ValueError(f"stepscope: state_dict was saved with config {state}, this object has "
                             f"{self.get_extra_state()}")

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        if prefix + "_extra_state" in state_dict:
            self.set_extra_state(state_dict[prefix + "_extra_state"])
        check_loaded_state(state_dict.get(prefix + "state"), self._num_outputs * FIELDS)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._placed = True
        self._synced_in_place = False

    def extra_repr(self) -> str:
        return f"num_outputs={self._num_outputs}"
