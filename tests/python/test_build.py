"""The build: what was compiled in, and that every op has its CPU, Meta (and CUDA) kernels."""

import shutil

import pytest
import torch

import stepscope

OP = "stepscope::classification_update"


def test_build_info_shape():
    info = stepscope.build_info()
    assert set(info) == {"torch_version", "cuda", "cuda_archs", "nvtx"}
    # Compiled against the torch that is running (a mismatch would fail at import anyway).
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert isinstance(info["nvtx"], bool)


@pytest.mark.skipif(not (shutil.which("nvcc") and torch.version.cuda), reason="needs nvcc and a CUDA build of torch")
def test_cuda_kernels_compiled_with_nvcc_present():
    info = stepscope.build_info()
    assert info["cuda"] is not None, "nvcc and a CUDA torch are present, but the CUDA kernels were not built"
    assert info["cuda_archs"], "CUDA build lists no architectures"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(OP, "CUDA")


def test_op_kernels_registered():
    for key in ["CPU", "Meta"]:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(OP, key), key
    if stepscope.build_info()["cuda"] is None:
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(OP, "CUDA")


def test_wheel_lists_every_package():
    # pyproject.toml names the packages one by one: a new subpackage left out of the list works in
    # an editable install (these tests) and is missing from every wheel.
    import pathlib
    import tomllib

    root = pathlib.Path(__file__).resolve().parents[2]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    base = root / "python"
    found = {".".join(p.parent.relative_to(base).parts) for p in (base / "stepscope").rglob("__init__.py")}
    assert found == listed, f"in python/ but not in pyproject.toml: {sorted(found - listed)}; " \
                            f"listed but absent: {sorted(listed - found)}"
