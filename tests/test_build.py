"""What the build recorded, and how the extension is linked."""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import sdpax


def test_build_config_matches_this_build():
    cfg = sdpax.build_config
    assert cfg.WITH_CUDA in (True, False)
    assert cfg.CPU_ISA in ("avx512", "avx2", "generic")
    assert isinstance(cfg.FLASH_KERNELS, dict)
    if not cfg.WITH_CUDA:
        assert "cuda" not in cfg.FLASH_KERNELS and cfg.CUDA_ARCHS == []
    assert cfg.TORCH_VERSION.split("+")[0].rsplit(".", 1)[0] == torch.__version__.split("+")[0].rsplit(".", 1)[0]


def test_cpu_isa_is_what_this_cpu_has():
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if " avx512f " in flags and " avx512bw " in flags and " avx512vl " in flags and " avx512dq " in flags:
        assert sdpax.build_config.CPU_ISA == "avx512"


def test_public_function_is_one_object():
    assert sdpax.scaled_dot_product_attention is sdpax.functional.scaled_dot_product_attention


@pytest.mark.skipif(shutil.which("ldd") is None, reason="no ldd")
def test_no_second_openmp_runtime():
    """The extension uses torch's OpenMP runtime (at::parallel_for); it must not load another one."""
    so = Path(sdpax._C.__file__)
    out = subprocess.run(["ldd", str(so)], capture_output=True, text=True, check=False).stdout
    omp = [line for line in out.splitlines() if "omp" in line.lower()]
    torch_lib = Path(torch.__file__).parent / "lib"
    for line in omp:
        target = line.split("=>")[-1].strip()
        assert str(torch_lib.resolve()) in str(Path(target.split(" ")[0]).resolve()), (
            f"the extension loads an OpenMP runtime other than torch's: {line.strip()}")
