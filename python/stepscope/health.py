"""Gradient statistics without a host sync: the global gradient norm, each parameter's norm, the
non-finite gradients named by parameter, and the parameters that never get a gradient.

    stats = stepscope.health.GradStats([n for n, _ in model.named_parameters()])
    for step, batch in enumerate(loader):
        loss = model(batch).sum(); loss.backward()
        stats.update(list(model.parameters()), step)   # before optimizer.step(); no sync
        optimizer.step(); optimizer.zero_grad()
    print(stats.read()["grad_norm"])                   # the one host read

`update` runs one torch.ops.stepscope.grad_stats_update (csrc/health/op.cpp) on the gradients'
device: it accumulates into a float64 state of fixed size (`nbytes`, 8 * numel with
numel = _C.health_layout(P, ring)["numel"]) and reads nothing back. `read` copies the state to
the host once and turns it into plain numbers.

Non-finite counts: on CPU `nonfinite_elements` is the exact count of NaN/inf gradient elements; on
CUDA (where the op is built from ATen ops until a fused kernel lands) it counts 1 per step for each
parameter whose gradient norm is non-finite. `read()["nonfinite"]["counts"]` says which.
"""

from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from . import _C

GradOrParam = Union[torch.Tensor, None]


class GradStats:
    """On-device gradient statistics over optimizer steps.

    names: one name per parameter, in the order `update` receives them; the parameters that
        require a gradient. model.named_parameters() already lists a shared parameter once.
    ring: how many recent steps `read()["recent"]` keeps.
    device: where the state lives; by default the device of the first gradient seen.
    """

    def __init__(self, names: Sequence[str], ring: int = 256, device: Optional[Union[str, torch.device]] = None):
        self.names: List[str] = list(names)
        if len(set(self.names)) != len(self.names):
            raise ValueError("stepscope: GradStats names must be unique (one per parameter)")
        if ring < 1:
            raise ValueError(f"stepscope: ring must be >= 1; got {ring}")
        self.ring = int(ring)
        self.layout: Dict[str, int] = _C.health_layout(len(self.names), self.ring)
        self._op = torch.ops.stepscope.grad_stats_update.default
        self._state: Optional[torch.Tensor] = None
        self._updates = 0
        if device is not None:
            self._make_state(torch.device(device))

    @property
    def nbytes(self) -> int:
        """The state's size in bytes: fixed, whatever the run's length."""
        return self.layout["bytes"]

    @property
    def state(self) -> Optional[torch.Tensor]:
        """The float64 state tensor (None before the first update when no device was given)."""
        return self._state

    def _make_state(self, device: torch.device) -> None:
        self._state = torch.empty(self.layout["numel"], dtype=torch.float64, device=device)
        _C.health_reset(self._state, len(self.names))

    def update(self, grads_or_params: Sequence[GradOrParam], step: int) -> None:
        """Accumulates one optimizer step, before the optimizer changes the weights.

        grads_or_params: one entry per name. A parameter (a leaf that requires grad) stands for
        its .grad; any other tensor is taken as the gradient itself; None means no gradient.
        step: the step number (>= 0), kept in the ring and for the first non-finite step.
        """
        if len(grads_or_params) != len(self.names):
            raise ValueError(
                f"stepscope: GradStats.update takes one entry per name ({len(self.names)}); "
                f"got {len(grads_or_params)}"
            )
        grads = [x.grad if isinstance(x, torch.Tensor) and x.requires_grad and x.is_leaf else x
                 for x in grads_or_params]
        if self._state is None:
            self._make_state(next((g.device for g in grads if g is not None), torch.device("cpu")))
        self._op(grads, self._state, step, self._updates % self.ring)
        self._updates += 1  # after the op: a refused update takes no ring slot

    def reset(self) -> None:
        """Forgets every update (the state stays where it is)."""
        if self._state is not None:
            _C.health_reset(self._state, len(self.names))
        self._updates = 0

    def read(self) -> Dict[str, Any]:
        """Everything accumulated, as plain Python numbers: the one host read (a device-to-host copy)."""
        if self._state is None:
            self._make_state(torch.device("cpu"))
        assert self._state is not None
        raw = _C.health_read(self._state, len(self.names))
        params = {n: {k: p[k] for k in ("norm_last", "norm_max", "norm_mean", "nonfinite_elements",
                                         "nonfinite_steps", "no_grad_steps")}
                  for n, p in zip(self.names, raw["params"])}
        steps = raw["steps"]
        first = raw["first_nonfinite_param"]
        return {
            "steps": steps,
            "grad_norm": raw["grad_norm"],
            "params": params,
            "nonfinite": {
                "steps": raw["nonfinite_steps"],
                "first_step": raw["first_nonfinite_step"] if raw["first_nonfinite_step"] >= 0 else None,
                "first_param": self.names[first] if first >= 0 else None,
                "counts": "elements" if self._state.device.type == "cpu" else "parameters",
            },
            "no_grad": {
                "names": [n for n, p in params.items() if steps > 0 and p["no_grad_steps"] == steps],
                "steps": steps,
            },
            "recent": raw["recent"],
        }
