"""Build script.

The package is pure Python; the optional compiled extension (csrc/) adds the backends "cpp"
(``crossvit_kernels._C_cpu``, C++ with OpenMP) and "cuda" (``crossvit_kernels._C_cuda``). They are
built with torch.utils.cpp_extension when a compiler (and, for "cuda", nvcc and a CUDA build of
torch) is present; a failed build prints a warning and the pure-Python package is installed.
Each module registers torch operators and holds no Python bindings: it is built against Python's
limited API (``py_limited_api``: one ``.abi3.so``; torch's build sets Py_LIMITED_API) and does not
link libtorch_python.

    pip install --no-build-isolation -e .       # in place, against the installed torch

Environment switches:
    CROSSVIT_KERNELS_NO_EXT=1     build no extension at all (pure-Python install)
    CROSSVIT_KERNELS_NO_CUDA=1    build only the CPU extension
    MAX_JOBS=N                    parallel compile jobs (default 2)
    TORCH_CUDA_ARCH_LIST="9.0"    CUDA architectures (default 9.0 when unset, to keep builds short)
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))
version = {}
with open(os.path.join(here, "crossvit_kernels", "_version.py")) as f:
    exec(f.read(), version)


def _warn(msg):
    bar = "=" * 78
    print(f"\n{bar}\nWARNING (crossvit-kernels): {msg}\n{bar}\n", file=sys.stderr, flush=True)


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _guess_cuda_home():
    """Point CUDA_HOME at the toolkit behind `nvcc` when it is unset (nvcc may be a wrapper script
    in /usr/local/bin, which would make torch guess /usr/local)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    for root in candidates:
        if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = root
            return


def _pip_cuda_include_dirs(torch):
    """Headers of the CUDA libraries torch was built with (cuBLAS, cuSPARSE, ...) that pip installs
    as nvidia-* wheels; a bare nvcc toolkit may lack them and torch's CUDA headers include them."""
    dirs = []
    try:
        import nvidia
        major = (torch.version.cuda or "").split(".")[0]
        for base in getattr(nvidia, "__path__", []):
            for sub in (f"cu{major}", "cuda_runtime", "cublas", "cusparse"):
                inc = os.path.join(base, sub, "include")
                if os.path.isdir(inc):
                    dirs.append(inc)
    except Exception:
        pass
    return dirs


def _extensions_and_cmdclass():
    if _flag("CROSSVIT_KERNELS_NO_EXT"):
        print("crossvit-kernels: CROSSVIT_KERNELS_NO_EXT=1, installing the pure-Python package", file=sys.stderr)
        return [], {}
    _guess_cuda_home()
    try:
        import torch
        from torch.utils import cpp_extension as tce
    except Exception as exc:  # no torch in the build environment (use --no-build-isolation)
        _warn(f"torch is not importable ({type(exc).__name__}: {exc}); installing without the compiled extension")
        return [], {}

    os.environ.setdefault("MAX_JOBS", "2")
    cxx_flags = ["-O3", "-g0", "-fopenmp", "-ffp-contract=fast", "-fvisibility=hidden", "-Wno-psabi"]
    if sys.platform == "darwin":  # Apple clang has no -fopenmp; the kernels then run on one thread
        cxx_flags.remove("-fopenmp")
    exts = [
        tce.CppExtension(
            "crossvit_kernels._C_cpu",
            ["csrc/crossvit_cpu.cpp"],
            extra_compile_args={"cxx": cxx_flags},
            py_limited_api=True,
        )
    ]

    cuda_reason = None
    if _flag("CROSSVIT_KERNELS_NO_CUDA"):
        cuda_reason = "CROSSVIT_KERNELS_NO_CUDA=1"
    elif torch.version.cuda is None:
        cuda_reason = "torch is a CPU-only build"
    elif tce.CUDA_HOME is None or not (
        shutil.which("nvcc") or os.path.exists(os.path.join(tce.CUDA_HOME, "bin", "nvcc"))
    ):
        cuda_reason = "nvcc was not found (set CUDA_HOME)"
    if cuda_reason is None:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        exts.append(
            tce.CUDAExtension(
                "crossvit_kernels._C_cuda",
                ["csrc/crossvit_cuda.cu"],
                include_dirs=_pip_cuda_include_dirs(torch),
                extra_compile_args={"cxx": ["-O3", "-g0", "-fvisibility=hidden"],
                                    "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]},
                py_limited_api=True,
            )
        )
    else:
        print(f"crossvit-kernels: not building the CUDA extension ({cuda_reason})", file=sys.stderr)

    class BuildExtension(tce.BuildExtension):
        """Builds each extension on its own; a failure is a warning, never a failed install."""

        def build_extensions(self):
            self._failed = []
            try:
                super().build_extensions()
            except Exception as exc:  # compiler missing or broken before any extension was built
                _warn(f"the compiled extension could not be built ({type(exc).__name__}: {exc}); "
                      "installing the pure-Python package (backends 'torch' and 'triton' still work)")
                self._failed = list(self.extensions)
            self.extensions = [e for e in self.extensions if e not in self._failed]

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                _warn(f"building {ext.name} failed ({type(exc).__name__}: {exc}); continuing without it. "
                      "See the compiler output above; CROSSVIT_KERNELS_NO_CUDA=1 skips the CUDA part and "
                      "CROSSVIT_KERNELS_NO_EXT=1 the whole extension")
                self._failed.append(ext)
                return
            # Python imports a module's interpreter-specific build before its .abi3.so: remove one
            # left in the source tree by an older build, or it would shadow the module just built.
            package, name = ext.name.rsplit(".", 1)
            for stale in glob.glob(os.path.join(here, *package.split("."), f"{name}.cpython-*")):
                print(f"crossvit-kernels: removing {stale}, an older build that would shadow {ext.name}",
                      file=sys.stderr)
                os.remove(stale)

    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions_and_cmdclass()

setup(
    name="crossvit-kernels",
    version=version["__version__"],
    description="Fused kernels and a timm-exact CrossViT",
    packages=find_packages(include=["crossvit_kernels", "crossvit_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    extras_require={"timm": ["timm>=1.0"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
