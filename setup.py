"""Build entry point. Metadata lives in pyproject.toml; this file builds the C++/CUDA extension
`llm2clip._C` (csrc/: the caption-cache row gather, see llm2clip/cache/_ext.py).

The extension compiles against the installed torch, so install torch first and build without
pip's build isolation (an isolated build would download torch a second time)::

    pip install torch numpy setuptools wheel ninja
    LLM2CLIP_FORCE_CUDA=1 pip install --no-build-isolation -e '.[test]'

Environment, read in one place (`BuildConfig.from_env`):

    LLM2CLIP_BUILD_EXT    unset: build the extension when torch is importable, else warn and
                          install pure Python; 1: the extension is required (error if it cannot
                          be built); 0: never build it (llm2clip.cache falls back to PyTorch)
    LLM2CLIP_FORCE_CUDA   1: compile the CUDA sources even without a visible GPU (CI compiles them
                          for sm_90 here) and fail if there is no CUDA toolkit; unset: CUDA sources
                          only when a GPU is visible and a toolkit is found (else a warning and a
                          CPU-only extension)
    TORCH_CUDA_ARCH_LIST  CUDA archs; default: the visible GPUs', or "9.0" (Hopper) without one
    CUDA_HOME, CUDA_PATH  the toolkit root (bin/nvcc, lib64/libcudart.so; a value without them is
                          ignored with a warning). Without them the root is
                          found automatically: the real nvcc behind a wrapper script on PATH (the
                          development machines' /usr/local/bin/nvcc execs /usr/local/cuda-13.0/...),
                          then /usr/local/cuda, /usr/local/cuda-*
    MAX_JOBS              parallel compile jobs for ninja (torch's default: all cores)
    LLM2CLIP_EXT_DEBUG    1: -O0 -g (and nvcc -lineinfo stays on) for debugging

If the toolkit's include folder has no cusparse.h (torch's CUDA headers may include it), the
`nvidia/cu<major>/include` folder of the pip-installed CUDA wheels is appended to CPATH.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"
CPU_SOURCES = [f"{CSRC}/gather.cpp"]
CUDA_SOURCES = [f"{CSRC}/gather_cuda.cpp", f"{CSRC}/gather_kernels.cu"]
EXT_NAME = "llm2clip._C"
DEFAULT_ARCH_WITHOUT_GPU = "9.0"  # the H100 / H200 this project trains on
CPU_ONLY = "building a CPU-only llm2clip._C"


def _tristate(name: str) -> bool | None:
    value = os.environ.get(name, "").strip().lower()
    if value == "":
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"setup.py: {name}={value!r}: use 1 or 0")


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """Every environment flag of the build, read once."""

    build_ext: bool | None  # LLM2CLIP_BUILD_EXT: None = auto
    force_cuda: bool  # LLM2CLIP_FORCE_CUDA
    arch_list: str | None  # TORCH_CUDA_ARCH_LIST
    cuda_home: str | None  # CUDA_HOME or CUDA_PATH as given
    max_jobs: str | None  # MAX_JOBS (torch's BuildExtension reads it from the environment)
    debug: bool  # LLM2CLIP_EXT_DEBUG

    @classmethod
    def from_env(cls) -> BuildConfig:
        return cls(
            build_ext=_tristate("LLM2CLIP_BUILD_EXT"),
            force_cuda=bool(_tristate("LLM2CLIP_FORCE_CUDA")),
            arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST") or None,
            cuda_home=os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or None,
            max_jobs=os.environ.get("MAX_JOBS") or None,
            debug=bool(_tristate("LLM2CLIP_EXT_DEBUG")),
        )


def _log(msg: str) -> None:
    print(f"llm2clip setup: {msg}", file=sys.stderr)


def _cudart_dir(root: Path) -> Path | None:
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
        if (root / sub / "libcudart.so").exists():
            return root / sub
    return None


def _is_cuda_root(root: Path) -> bool:
    return (root / "bin" / "nvcc").is_file() and _cudart_dir(root) is not None


def _nvcc_roots(nvcc: str) -> list[Path]:
    """Toolkit roots implied by an nvcc on PATH: its real path's parent, and for a wrapper script
    (`exec /usr/local/cuda-13.0/bin/nvcc "$@"`) the nvcc paths it names."""
    real = Path(os.path.realpath(nvcc))
    roots = [real.parent.parent]
    try:
        head = real.read_bytes()[:8192]
    except OSError:
        head = b""
    if head.startswith(b"#!"):
        for match in re.finditer(rb"(/[^\s'\"]*?/bin/nvcc)\b", head):
            target = Path(os.path.realpath(match.group(1).decode(errors="replace")))
            if target != real:
                roots.append(target.parent.parent)
    return roots


def find_cuda_home(cfg: BuildConfig) -> Path | None:
    """The CUDA toolkit root: CUDA_HOME/CUDA_PATH if set, else the first root that holds both
    bin/nvcc and libcudart.so (torch's own guess, dirname(dirname(which nvcc)), is wrong for an
    nvcc wrapper script in /usr/local/bin)."""
    if cfg.cuda_home:
        root = Path(cfg.cuda_home)
        if _is_cuda_root(root):
            return root
        _log(f"WARNING: CUDA_HOME={root} holds no bin/nvcc + lib64/libcudart.so; ignoring it")
        return None
    candidates: list[Path] = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += _nvcc_roots(nvcc)
    candidates.append(Path("/usr/local/cuda"))
    candidates += [Path(p) for p in sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for root in candidates:
        if _is_cuda_root(root):
            return root.resolve()
    return None


def find_cusparse_include(cuda_home: Path, torch_cuda_version: str) -> str | None:
    """A folder holding cusparse.h when the toolkit lacks it: the pip CUDA wheels' include folder
    (nvidia/cu13/include for CUDA 13, nvidia/cusparse/include for CUDA 12)."""
    if (cuda_home / "include" / "cusparse.h").exists():
        return None
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return None
    major = torch_cuda_version.split(".")[0]
    for base in spec.submodule_search_locations:
        for sub in (f"cu{major}/include", "cusparse/include"):
            if (Path(base) / sub / "cusparse.h").exists():
                return str(Path(base) / sub)
    return None


def _fail_or_warn(required: bool, msg: str, fallback: str) -> None:
    if required:
        raise SystemExit(f"llm2clip setup: ERROR: {msg}")
    _log(f"WARNING: {msg}; {fallback}")


def extension_modules(cfg: BuildConfig) -> tuple[list, dict]:
    """(ext_modules, cmdclass) for setup(); empty when the extension is skipped."""
    required = cfg.build_ext is True or cfg.force_cuda
    if cfg.build_ext is False:
        _log("LLM2CLIP_BUILD_EXT=0: not building llm2clip._C (pure-PyTorch cache gather)")
        return [], {}
    try:
        import torch
    except ImportError:
        _fail_or_warn(
            required,
            "torch is not importable at build time (install torch first and build with "
            "`pip install --no-build-isolation`)",
            "not building llm2clip._C (pure-PyTorch cache gather)",
        )
        return [], {}

    want_cuda = cfg.force_cuda or torch.cuda.is_available()
    cuda_home = None
    if want_cuda:
        if torch.version.cuda is None:
            _fail_or_warn(cfg.force_cuda, f"torch {torch.__version__} is a CPU build", CPU_ONLY)
            want_cuda = False
        else:
            cuda_home = find_cuda_home(cfg)
            if cuda_home is None:
                _fail_or_warn(
                    cfg.force_cuda,
                    "no CUDA toolkit found (set CUDA_HOME to the root holding bin/nvcc and "
                    "lib64/libcudart.so)",
                    CPU_ONLY,
                )
                want_cuda = False

    if want_cuda:
        # torch.utils.cpp_extension reads CUDA_HOME when it is first imported: set it before.
        os.environ["CUDA_HOME"] = str(cuda_home)
        extra_include = find_cusparse_include(cuda_home, torch.version.cuda)
        if extra_include:
            cpath = os.environ.get("CPATH")
            os.environ["CPATH"] = f"{cpath}{os.pathsep}{extra_include}" if cpath else extra_include
        if not cfg.arch_list and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_WITHOUT_GPU
        _log(
            f"building {EXT_NAME} with CUDA: CUDA_HOME={cuda_home}, "
            f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST') or '(visible GPUs)'}"
            + (f", CPATH += {extra_include}" if extra_include else "")
        )
    else:
        _log(f"building {EXT_NAME} for CPU only")

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    opt = ["-O0", "-g"] if cfg.debug else ["-O3"]
    cxx = [*opt, "-Wall", "-Wno-unknown-pragmas"]
    if want_cuda:
        ext = CUDAExtension(
            EXT_NAME,
            sources=CPU_SOURCES + CUDA_SOURCES,
            define_macros=[("LLM2CLIP_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": [*opt, "-lineinfo"]},
        )
    else:
        ext = CppExtension(EXT_NAME, sources=CPU_SOURCES, extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules(BuildConfig.from_env())
setup(ext_modules=ext_modules, cmdclass=cmdclass)
