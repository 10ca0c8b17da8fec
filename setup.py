"""Build script for sdpax.

Build options (environment variables):
  SDPAX_CUDA=0|1         force the CUDA kernels off / on (default: on when torch has CUDA and nvcc is found)
  TORCH_CUDA_ARCH_LIST   CUDA architectures (default "8.0;9.0a")
  SDPAX_CPU_ISA=auto|avx512|avx2|generic
                         instruction set for the fused CPU kernels (default auto: what this CPU has)
  SDPAX_DEBUG=1          -O0 -g builds

What was built is written to python/sdpax/_build_config.py, which tests read to skip what is not there.
"""
import os
import re
import sys
from pathlib import Path

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
DEBUG = os.environ.get("SDPAX_DEBUG", "0") == "1"



def _cpu_flags():
    """Which ISA the fused CPU kernels are compiled for.

    at::vec picks its implementation from CPU_CAPABILITY_* macros; without them Vectorized<float> is the generic
    (scalar-loop) version, so the macro and the matching -m flags must go together.
    """
    isa = os.environ.get("SDPAX_CPU_ISA", "auto").lower()
    if isa == "auto":
        flags = ""
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            pass
        have = set(re.findall(r"\b[\w]+\b", flags))
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= have:
            isa = "avx512"
        elif {"avx2", "fma"} <= have:
            isa = "avx2"
        else:
            isa = "generic"
    if isa == "avx512":
        return isa, ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                     "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]
    if isa == "avx2":
        return isa, ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    if isa == "generic":
        return isa, ["-DCPU_CAPABILITY=DEFAULT"]
    raise SystemExit(f"SDPAX_CPU_ISA must be auto, avx512, avx2 or generic, got {isa!r}")


def _want_cuda():
    env = os.environ.get("SDPAX_CUDA")
    possible = torch.version.cuda is not None and CUDA_HOME is not None
    if env is None:
        return possible
    if env == "1" and not possible:
        raise SystemExit("SDPAX_CUDA=1 but torch has no CUDA (torch.version.cuda is None) or nvcc was not found")
    return env == "1"


def _cuda_archs():
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    return [a.strip() for a in re.split(r"[;, ]+", archs) if a.strip()]


def _gencode(archs):
    flags = []
    for a in archs:
        num = a.replace(".", "").replace("+PTX", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if a.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def _load_variants():
    import importlib.util
    spec = importlib.util.spec_from_file_location("sdpax_variants", CSRC / "variants.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    isa, isa_flags = _cpu_flags()
    with_cuda = _want_cuda()
    archs = _cuda_archs() if with_cuda else []

    # The table of kernels and limits (csrc/variants.py) generates headers for every build and, with CUDA, one
    # translation unit per kernel variant. cuda/plan.cpp (the launch plan) is plain C++ in every build.
    variants = _load_variants()
    generated = variants.generate(CSRC / "gen", with_cuda)
    sources = sorted(str(p.relative_to(ROOT)) for d in ("", "common", "math", "cpu")
                     for p in (CSRC / d).glob("*.cpp")) + ["csrc/cuda/plan.cpp", "csrc/cuda/plan_op.cpp"]
    # No -std flag: torch.utils.cpp_extension adds the standard this torch needs (C++17, C++20 from torch 2.14).
    cxx = ["-O0" if DEBUG else "-O3", "-fopenmp", "-Wall", "-Wno-unused-function"] + isa_flags
    if DEBUG:
        cxx.append("-g")
    include_dirs = [str(CSRC)]
    # py_limited_api: the extension uses only CPython's stable C API (module.cpp; no pybind11); torch defines
    # Py_LIMITED_API and the build is one _C.abi3.so that loads in every CPython that runs the same torch.
    ext_kwargs = dict(name="sdpax._C", include_dirs=include_dirs, py_limited_api=True)

    if with_cuda:
        sources += sorted(str(p.relative_to(ROOT)) for p in (CSRC / "cuda").glob("*.c*")
                    if p.name not in ("plan.cpp", "plan_op.cpp"))
        sources += sorted(str(p.relative_to(ROOT)) for p in generated)
        nvcc = ["-O3", "--expt-relaxed-constexpr", "--use_fast_math", "-lineinfo",
                "-DSDPAX_WITH_CUDA"] + _gencode(archs)
        if "9.0a" in archs or "9.0a+PTX" in archs:
            # sm_90a code (wgmma) is in the build: the host may pick the Hopper forward main loop (launch.cu).
            nvcc.append("-DSDPAX_BUILD_SM90A")
        ext = CUDAExtension(sources=sources, extra_compile_args={"cxx": cxx + ["-DSDPAX_WITH_CUDA"], "nvcc": nvcc},
                            **ext_kwargs)
    else:
        ext = CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **ext_kwargs)

    # Record what this build contains; tests and the backend selector read it.
    cfg = ROOT / "python" / "sdpax" / "_build_config.py"
    cfg.write_text(
        "# Generated by setup.py: what this build of sdpax contains.\n"
        f"WITH_CUDA = {with_cuda!r}\n"
        f"CUDA_ARCHS = {archs!r}\n"
        f"CPU_ISA = {isa!r}\n"
        f"FLASH_KERNELS = {variants.flash_kernels(with_cuda)!r}\n"
        f"FLASH_LIMITS = {variants.flash_limits()!r}\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"DEBUG = {DEBUG!r}\n"
    )

    setup(
        package_dir={"": "python"},
        packages=find_packages("python"),
        ext_modules=[ext],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    sys.exit(main())
