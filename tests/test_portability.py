"""The C kernels compile as C11 with and without OpenMP, for this machine and for aarch64.

The default build must run on any x86-64 (the AVX-512/AVX2 paths are target clones picked at
load time) and build on aarch64, where the x86 dispatch and flush-to-zero compile away. These
tests compile every kernel header with the project's flags; the aarch64 one needs a cross
compiler (Debian's gcc-aarch64-linux-gnu, which .ci/run installs) and skips without it.
"""
import pathlib
import shutil
import subprocess

import pytest

KERNELS = pathlib.Path(__file__).resolve().parents[1] / "src" / "optcore" / "_kernels"
HEADERS = sorted(p.name for p in KERNELS.glob("oc_*.h"))
FLAGS = ["-std=c11", "-O2", "-fno-math-errno", "-ffp-contract=off", "-Wall", "-Werror",
         "-Wno-unknown-pragmas", "-Wno-unused-function"]


def _compile(cc, extra, tmp_path):
    src = tmp_path / "all_kernels.c"
    src.write_text("".join(f'#include "{h}"\n' for h in HEADERS) + "int main(void) { return 0; }\n")
    out = subprocess.run([cc, *FLAGS, *extra, f"-I{KERNELS}", "-c", str(src), "-o",
                          str(tmp_path / "all_kernels.o")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_every_header_is_included():
    assert {"oc_common.h", "oc_optim.h", "oc_norms.h", "oc_batchnorm.h"} <= set(HEADERS)


@pytest.mark.parametrize("openmp", [True, False], ids=["openmp", "no-openmp"])
@pytest.mark.parametrize("cc", ["cc", "aarch64-linux-gnu-gcc"])
def test_headers_compile(cc, openmp, tmp_path):
    if not KERNELS.is_dir():
        pytest.skip("kernel sources not present (installed package only)")
    if shutil.which(cc) is None:
        pytest.skip(f"{cc} not installed")
    _compile(cc, ["-fopenmp"] if openmp else ["-DOPTCORE_NO_OPENMP"], tmp_path)
