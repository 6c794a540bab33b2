"""Builds fastattn._C from kernels/: the CPU sources always, the CUDA sources whenever nvcc and a
CUDA build of torch are present (no visible GPU needed, so CI compiles and links them).

Environment switches:
  FASTATTN_NO_CUDA=1        CPU-only build (quick local iteration)
  FASTATTN_CUDA_ARCHS       ';'-separated compute capabilities, default "80;90" (sm_80, sm_90
                            machine code plus compute_90 PTX for newer GPUs)
  FASTATTN_PTXAS_VERBOSE=1  print ptxas resource usage (registers, spills) while building
  CUDA_HOME                 the CUDA toolkit; found from nvcc when unset (see _find_cuda_home)
  MAX_JOBS                  parallel compile jobs (ninja)
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0", "false", "False")


def _find_cuda_home():
    """The toolkit folder behind `nvcc`. A wrapper script on PATH (as on this project's machines)
    makes torch guess the wrong folder, so ask nvcc itself: `nvcc --dryrun` prints `TOP=<bin>/..`."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        ).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ TOP=(.+)$", out, re.MULTILINE)
    return os.path.realpath(m.group(1).strip()) if m else None


_want_cuda = not _flag("FASTATTN_NO_CUDA")
if _want_cuda and "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
    home = _find_cuda_home()
    if home:
        os.environ["CUDA_HOME"] = home  # must be set before torch.utils.cpp_extension is imported

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _nvidia_include_dirs():
    """CUDA headers that pip's nvidia-* wheels ship (e.g. site-packages/nvidia/cu13/include);
    torch's CUDA headers include some (cublas, cusparse) that the toolkit here lacks."""
    dirs = []
    for entry in sys.path:
        dirs += sorted(glob.glob(os.path.join(entry, "nvidia", "*", "include")))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def _gencode_flags():
    archs = [a.strip() for a in os.environ.get("FASTATTN_CUDA_ARCHS", "80;90").split(";") if a.strip()]
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    top = archs[-1].rstrip("a")
    flags.append(f"-gencode=arch=compute_{top},code=compute_{top}")
    return flags


def _extension():
    cpu_sources = ["kernels/registration.cpp"] + sorted(glob.glob("kernels/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("kernels/cuda/*.cu"))
    include_dirs = [os.path.join(ROOT, "kernels", "include")]
    cxx = ["-O3", "-fvisibility=hidden"]
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is OpenMP in torch's Linux builds; without -fopenmp its pragmas are
        # ignored and kernels run on one thread. libgomp resolves to the copy torch loaded.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    with_cuda = _want_cuda and torch.version.cuda is not None and CUDA_HOME is not None
    if _want_cuda and not with_cuda:
        why = "torch is a CPU-only build" if torch.version.cuda is None else "nvcc not found"
        print(f"fastattn: building without CUDA kernels ({why})", file=sys.stderr)
    if not with_cuda:
        return CppExtension("fastattn._C", cpu_sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx}, extra_link_args=link)
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + _gencode_flags()
    if _flag("FASTATTN_PTXAS_VERBOSE"):
        nvcc.append("-Xptxas=-v")
    print(f"fastattn: building CUDA kernels with {CUDA_HOME}/bin/nvcc for {_gencode_flags()}",
          file=sys.stderr)
    return CUDAExtension("fastattn._C", cpu_sources + cuda_sources,
                         include_dirs=include_dirs + _nvidia_include_dirs(),
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link)


setup(
    packages=["fastattn", "fastattn.ops", "fastattn.nn", "fastattn.models", "fastattn._triton",
              "fastattn.benchmarks"],
    package_dir={"fastattn._triton": "kernels/triton", "fastattn.benchmarks": "benchmarks"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
