"""What was built and what it runs on: ``optcore.show_config()`` and ``optcore info``."""
import platform
import sys

import numpy as np

from optcore._kernels import _runtime


def config():
    """Return the build and run-time configuration as a dict.

    Keys: ``version``, ``python``, ``numpy``, ``platform``, ``openmp`` (bool),
    ``openmp_version`` (the ``_OPENMP`` date, 0 without OpenMP), ``isa`` (the instruction set
    the kernels dispatch to on this CPU: ``avx512f``, ``avx2``, ``x86-64`` or the
    architecture), ``isa_dispatch`` (bool: the loader picked ``isa`` for this CPU; False for a
    build of one path, ``-Disa=...``, or another architecture), ``num_threads``,
    ``num_procs``, ``flush_denormal``, ``chunk`` (elements per work item).
    """
    from optcore import __version__

    info = {"version": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "platform": f"{platform.system()} {platform.machine()}"}
    info.update(_runtime.build_info())
    return info


def show_config(file=None):
    """Print the version, OpenMP runtime, thread count and instruction set in use."""
    info = config()
    omp = f"yes (_OPENMP {info['openmp_version']})" if info["openmp"] else "no (single-threaded build)"
    lines = [
        f"optcore {info['version']}",
        f"  python          {info['python']} ({info['platform']}), numpy {info['numpy']}",
        f"  openmp          {omp}",
        f"  threads         {info['num_threads']} of {info['num_procs']} processors",
        f"  instruction set {info['isa']}"
        f"{' (picked for this CPU)' if info['isa_dispatch'] else ' (the one path built)'}",
        f"  flush denormals {'on' if info['flush_denormal'] else 'off'}",
        f"  chunk           {info['chunk']} elements",
    ]
    print("\n".join(lines), file=file or sys.stdout)
