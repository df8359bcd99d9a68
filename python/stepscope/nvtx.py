"""Your own NVTX ranges and marks in the "stepscope" domain, beside the Monitor's phases.

    import stepscope

    with stepscope.nvtx.range("load batch"):
        x, y = next(it)

    @stepscope.nvtx.range("augment", color="#2CA02C")
    def augment(x): ...

    stepscope.nvtx.mark("checkpoint saved")

Ranges are push/pop ranges on the calling thread, in the domain "stepscope", category "user";
names are registered strings. With no tool attached (decided at import, as NVTX decides it at
its first call) a range costs only its Python object and the `with` (bench/nvtx_bench.py
measures it), and the decorator returns the function unchanged. Nsight Systems shows them
under the "stepscope" NVTX row of the thread (see the README, "Viewing in Nsight Systems").
``set_enabled(False)`` silences all stepscope ranges in the process, the Monitor's included.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, TypeVar, Union

from . import _C

_nv = _C.nvtx
_push = _nv.range_push
_pop = _nv.range_pop
# NVTX decides once per process, at its first call, whether a tool is attached; asking at
# import makes that call, and with no tool (final) the ranges skip the two C++ calls entirely.
_NO_TOOL: bool = not _nv.tool_attached()

Color = Union[int, str, None]
F = TypeVar("F", bound=Callable)

__all__ = ["range", "mark", "enabled", "set_enabled", "tool_attached", "compiled_in", "DOMAIN"]

DOMAIN: str = _nv.DOMAIN


def _argb(color: Color) -> int:
    """0 (the category's colour) for None; ARGB for 0xRRGGBB / 0xAARRGGBB ints or "#RRGGBB" /
    "#AARRGGBB" strings (no alpha given: opaque)."""
    if color is None:
        return 0
    if isinstance(color, str):
        digits = color[1:] if color.startswith("#") else color
        if len(digits) not in (6, 8):
            raise ValueError(f"stepscope.nvtx: color must be '#RRGGBB' or '#AARRGGBB'; got {color!r}")
        try:
            value = int(digits, 16)
        except ValueError:
            raise ValueError(
                f"stepscope.nvtx: color must be '#RRGGBB' or '#AARRGGBB'; got {color!r}"
            ) from None
        if len(digits) == 6:
            value |= 0xFF000000
    elif isinstance(color, int) and not isinstance(color, bool):
        value = color
        if not 0 <= value <= 0xFFFFFFFF:
            raise ValueError(f"stepscope.nvtx: color must be 0xRRGGBB or 0xAARRGGBB; got {color:#x}")
        if value <= 0xFFFFFF:
            value |= 0xFF000000
    else:
        raise TypeError(
            "stepscope.nvtx: color must be None, an int or a '#RRGGBB' string; "
            f"got {type(color).__name__}"
        )
    return value


class range:  # noqa: A001  (stepscope.nvtx.range, like torch.cuda.nvtx.range)
    """A push/pop NVTX range named ``name`` in the stepscope domain, as a context manager or a
    decorator.

    Args:
        name: the range's message (registered once as an NVTX string).
        color: None (the "user" category's colour), an int 0xRRGGBB / 0xAARRGGBB, or a string
            "#RRGGBB" / "#AARRGGBB".

    The range closes when the block exits, exceptions included. One object may be entered
    again, nested or from several threads: it keeps no state between enter and exit.

    Example::

        with stepscope.nvtx.range("eval", color=0x17BECF):
            evaluate(model)

        @stepscope.nvtx.range("collate")
        def collate(batch): ...
    """

    __slots__ = ("name", "argb")

    def __init__(self, name: str, color: Color = None) -> None:
        if not isinstance(name, str):
            raise TypeError(f"stepscope.nvtx.range: name must be a str; got {type(name).__name__}")
        self.name = name
        self.argb = _argb(color)

    def __enter__(self) -> "range":
        if not _NO_TOOL:
            _push(self.name, self.argb)
        return self

    def __exit__(self, *exc) -> bool:
        if not _NO_TOOL:
            _pop()
        return False

    def __call__(self, fn: F) -> F:
        # A push/pop range must open and close on one thread with nothing interleaved; a
        # generator or coroutine suspends inside it, so it would time the wrong thing.
        if (inspect.isgeneratorfunction(fn) or inspect.iscoroutinefunction(fn)
                or inspect.isasyncgenfunction(fn)):
            raise TypeError(
                f"stepscope.nvtx.range: cannot decorate generator or coroutine function {fn.__qualname__}: "
                "a push/pop range would stay open across its suspensions; use `with` inside it instead")
        name, argb = self.name, self.argb
        if _NO_TOOL:
            return fn  # nothing can ever listen in this process: no wrapper, no cost

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            _push(name, argb)
            try:
                return fn(*args, **kwargs)
            finally:
                _pop()

        return wrapper  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"stepscope.nvtx.range({self.name!r}, color={self.argb:#010x})"


def mark(name: str, color: Color = None) -> None:
    """An instantaneous NVTX marker named ``name`` in the stepscope domain ("user" category).

    Example::

        stepscope.nvtx.mark("lr decayed")
    """
    if not isinstance(name, str):
        raise TypeError(f"stepscope.nvtx.mark: name must be a str; got {type(name).__name__}")
    argb = _argb(color)
    if not _NO_TOOL:
        _nv.mark(name, -1, argb)


def enabled() -> bool:
    """True when NVTX is compiled in and not switched off with ``set_enabled(False)``."""
    return _nv.enabled()


def set_enabled(on: bool) -> None:
    """Switch all stepscope NVTX ranges on or off for the whole process (Monitor's too).
    Ranges already open when it is switched off still close."""
    _nv.set_enabled(bool(on))


def tool_attached() -> bool:
    """True when a tool (nsys, ncu, or a library named by NVTX_INJECTION64_PATH) receives the
    ranges. Decided once, at the process's first NVTX call."""
    return _nv.tool_attached()


def compiled_in() -> bool:
    """True when stepscope was built with the NVTX v3 headers."""
    return _nv.compiled_in()
