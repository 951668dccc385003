"""Install the reference, llama-cpp-python 0.3.36, built so that it works on every x86-64 machine here.

A native build (-march=native) on an Intel CPU with AMX compiles ggml's AMX kernels, and GCC 12
miscompiles them: every Q8_0 / K-quant model dies at `ldtilecfg` (SIGSEGV). Explicit -mno-amx-*
flags win over -march=native in GCC whatever their order, so the build keeps every other native
feature (AVX-512, VNNI, the CPU_REPACK kernels) and drops only AMX; on AMD they change nothing.

pip's wheel cache keys a built wheel on the sdist alone, not on the build flags, so a native wheel
cached earlier would be reused. This script therefore builds with --no-cache-dir into its own
directory, named after the flags, installs that wheel by path, and recognises it afterwards by the
wheel path pip records (direct_url.json). Run it before `pip install -e ".[test]"`, which then finds
llama-cpp-python==0.3.36 satisfied. Standard library only.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

VERSION = "0.3.36"
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
FLAGS = NO_AMX if platform.machine() in ("x86_64", "AMD64") else ""


def wheel_dir() -> Path:
    root = Path(os.environ.get("LOCALMOE_CACHE", Path.home() / ".cache" / "localmoe"))
    tag = hashlib.sha256(f"{VERSION} {FLAGS}".encode()).hexdigest()[:12]
    return root / "reference-wheels" / tag


def our_wheel(d: Path) -> Path | None:
    # py3-none-<platform>: the library is loaded through ctypes, so one wheel serves every Python
    found = sorted(d.glob(f"llama_cpp_python-{VERSION}-*.whl"))
    return found[-1] if found else None


def installed_from(d: Path) -> bool:
    """llama-cpp-python VERSION is installed, from a wheel in d."""
    try:
        dist = metadata.distribution("llama_cpp_python")
    except metadata.PackageNotFoundError:
        return False
    url = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "")
    return dist.version == VERSION and url.startswith(d.resolve().as_uri() + "/")


def pip(*args: str, env=None) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def main() -> int:
    d = wheel_dir()
    if installed_from(d):
        print(f"llama-cpp-python {VERSION} (flags: {FLAGS or 'none'}) is installed from {d}")
        return 0
    whl = our_wheel(d)
    if whl is None:
        print(f"building llama-cpp-python {VERSION} from source with CFLAGS/CXXFLAGS '{FLAGS}' "
              f"(about 12 minutes on 2 cores)", flush=True)
        env = {**os.environ, "CFLAGS": f"{os.environ.get('CFLAGS', '')} {FLAGS}".strip(),
               "CXXFLAGS": f"{os.environ.get('CXXFLAGS', '')} {FLAGS}".strip()}
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        tmp = d.with_name(d.name + ".building")
        shutil.rmtree(tmp, ignore_errors=True)
        pip("wheel", "--no-deps", "--no-cache-dir", "--no-binary", "llama-cpp-python",
            f"llama-cpp-python=={VERSION}", "-w", str(tmp), env=env)
        built = our_wheel(tmp)
        if built is None:
            raise SystemExit(f"error: pip built no llama-cpp-python {VERSION} wheel in {tmp}")
        d.mkdir(parents=True, exist_ok=True)
        whl = built.replace(d / built.name)  # a wheel appears in d only when whole
    # replace whatever llama-cpp-python is there, then add its missing dependencies (numpy,
    # typing-extensions, diskcache, jinja2) without touching installed ones
    pip("install", "--force-reinstall", "--no-deps", "--no-cache-dir", str(whl))
    pip("install", "--no-cache-dir", str(whl))
    if not installed_from(d):
        raise SystemExit(f"error: installed {whl}, but pip does not report it as the installed llama-cpp-python")
    return 0


if __name__ == "__main__":
    sys.exit(main())
