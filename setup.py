"""Builds stepscope._C by driving CMake (CMakeLists.txt is the only build definition).

    pip install --no-build-isolation -e .     # editable: _C lands in python/stepscope
    pip install --no-build-isolation .        # wheel: _C and libstepscope inside the package

Environment: STEPSCOPE_BUILD_DIR (default build/), STEPSCOPE_CMAKE_ARGS (extra -D flags),
TORCH_CUDA_ARCH_LIST (CUDA architectures), MAX_JOBS (parallel compile jobs).
"""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def cmake_exe() -> str:
    """The cmake of the `cmake` wheel when installed (new enough for nvcc 13 + C++20), else PATH's."""
    try:
        import cmake

        return os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
    except ImportError:
        return "cmake"


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import torch  # noqa: F401  (fail early and clearly when torch is missing)

        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        pkg_dir = ext_path.parent
        pkg_dir.mkdir(parents=True, exist_ok=True)
        # CMake always writes _C and libstepscope into the source package (so an editable
        # install and `PYTHONPATH=python` both work); a wheel build copies them from there.
        src_pkg = ROOT / "python" / "stepscope"
        build_dir = Path(os.environ.get("STEPSCOPE_BUILD_DIR", ROOT / "build")).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        exe = cmake_exe()
        args = [
            exe,
            "-S", str(ROOT),
            "-B", str(build_dir),
            "-G", "Ninja",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DSTEPSCOPE_PACKAGE_DIR={src_pkg}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('CMAKE_BUILD_TYPE', 'Release')}",
            "-Wno-dev",
        ]
        args += shlex.split(os.environ.get("STEPSCOPE_CMAKE_ARGS", ""))
        subprocess.run(args, check=True)
        build = [exe, "--build", str(build_dir)]
        if "MAX_JOBS" in os.environ:
            build += ["-j", os.environ["MAX_JOBS"]]
        subprocess.run(build, check=True)
        if pkg_dir != src_pkg.resolve():
            for lib in list(src_pkg.glob("_C*.so")) + list(src_pkg.glob("libstepscope*.so*")):
                shutil.copy2(lib, pkg_dir / lib.name)


setup(
    ext_modules=[CMakeExtension("stepscope._C")],
    cmdclass={"build_ext": CMakeBuild},
)
