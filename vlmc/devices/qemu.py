"""qemu-aarch64: an emulated ARM64 Linux user space that runs a bundle's ONNX programs on onnxruntime's ARM
kernels and its TVM programs from their aarch64 libraries.

What it is for: the numerics of the aarch64 kernels (onnxruntime's NEON fp32 and int8 dot-product paths, the
code TVM cross-compiled for the board) checked against the host, before a board is at hand. Its timings are an
emulator's and no cost signal; profiles say so.

`vlmc devices setup qemu-aarch64` builds the user space once into a cache folder ($VLMC_CACHE or
~/.cache/vlmc): Debian's arm64 Python and the libraries it needs (the archive's signature checked with
gpgv, every package's sha256 checked against the signed index), and aarch64 wheels of onnxruntime, of TVM's
runtime (where the host has TVM) and of vlmc's light dependencies from PyPI, at the host's versions. A run
starts `qemu-aarch64 -cpu <model>` on that Python in a private mount namespace where /proc/cpuinfo describes
the emulated CPU (the runtimes read it to pick kernels; the host's x86 cpuinfo, or `-cpu max`, makes them
pick wrong ones). vlmc itself is the host's own package.

ExecuTorch is not offered here: its Python runtime links libtorch, and PyPI's aarch64 torch is a CUDA
build that needs several GB of CUDA libraries to load.
"""
from __future__ import annotations

import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Callable

from vlmc.devices import DeviceConfig
from vlmc.cache import MARKER, cache_root, is_set_up, set_up
from vlmc.devices.stream import RemoteProcessDevice, expand
from vlmc.errors import VlmcError

DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SUITE = "bookworm"
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
GUEST_PYTHON = "usr/bin/python3.11"  # bookworm's Python; the wheels are fetched for its ABI (cp311)
GUEST_CACHE_TAG = "cpython-311"  # its bytecode's tag: a host Python with the same one precompiles the guest's files
SYSROOT_ROOTS = ("python3.11-minimal", "libpython3.11-stdlib", "libstdc++6", "libgomp1")
SYSROOT_SKIP = {"debconf", "tzdata", "media-types", "mime-support", "perl-base", "dpkg"}  # maintainer-script machinery
GUEST_WHEELS = ("numpy", "pyyaml", "pydantic", "tokenizers")  # what vlmc.remote imports besides the runtimes
# The host's packages whose aarch64 wheels the guest gets at the same version, so numerics compare like for like:
# record key -> the distributions (the first one's version is what the set-up records).
GUEST_RUNTIMES = {"onnxruntime": ("onnxruntime",), "tvm": ("apache-tvm", "apache-tvm-ffi")}
# The guest runs compiled libraries only (TVM_USE_RUNTIME_LIB=1): TVM's compiler library and the headers and
# sources its wheel carries for building (260 of its 280 MB) are left out of the user space.
TVM_BUILD_ONLY = ("tvm/lib/libtvm_compiler.so", "tvm/3rdparty", "tvm/include", "tvm/src")
DEFAULT_CPU = "cortex-a76"
# The /proc/cpuinfo each CPU model shows on real hardware (MIDR fields and the kernel's feature names).
CPUS = {
    "cortex-a53": {"part": "0xd03", "variant": "0x0", "revision": "4", "features": "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"},
    "cortex-a72": {"part": "0xd08", "variant": "0x0", "revision": "3", "features": "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"},
    "cortex-a76": {"part": "0xd0b", "variant": "0x4", "revision": "1",
                   "features": "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"},
    "neoverse-n1": {"part": "0xd0c", "variant": "0x3", "revision": "1",
                    "features": "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs"},
}
# Mounting the emulated CPU's cpuinfo needs a shell between unshare and qemu; the paths arrive as
# positional parameters, never inside the script.
MOUNT_AND_EXEC = 'mount --bind "$1" /proc/cpuinfo && shift && exec "$@"'


def default_sysroot() -> Path:
    return cache_root() / "qemu-aarch64"


def qemu_binary() -> str | None:
    return shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")


def cpuinfo_text(cpu: str, count: int) -> str:
    spec = CPUS[cpu]
    block = (f"BogoMIPS\t: 50.00\nFeatures\t: {spec['features']}\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
             f"CPU variant\t: {spec['variant']}\nCPU part\t: {spec['part']}\nCPU revision\t: {spec['revision']}\n")
    return "".join(f"processor\t: {i}\n{block}\n" for i in range(count))


# --- set-up -------------------------------------------------------------------------------------------------

def _download(url: str, timeout_s: float = 120) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.read()
    except OSError as e:
        raise VlmcError(f"could not fetch {url}: {e}") from None


def _signed_index() -> dict[str, dict]:
    """The arm64 package index of Debian main, its InRelease signature and sha256 checked."""
    if shutil.which("gpgv") is None or not DEBIAN_KEYRING.is_file():
        raise VlmcError(f"checking Debian's signature needs gpgv and {DEBIAN_KEYRING} (apt-get install gpgv debian-archive-keyring)")
    with tempfile.TemporaryDirectory() as tmp:
        release = Path(tmp) / "InRelease"
        release.write_bytes(_download(f"{DEBIAN_MIRROR}/dists/{DEBIAN_SUITE}/InRelease"))
        checked = subprocess.run(["gpgv", "--keyring", str(DEBIAN_KEYRING), "--output", "-", str(release)],
                                 capture_output=True)
    if checked.returncode != 0:
        raise VlmcError(f"Debian's {DEBIAN_SUITE} InRelease failed its signature check: {checked.stderr.decode().strip().splitlines()[-1:]}")
    name = "main/binary-arm64/Packages.xz"
    match = re.search(rf"^ ([0-9a-f]{{64}})\s+\d+\s+{re.escape(name)}$", checked.stdout.decode(), re.M)
    if not match:
        raise VlmcError(f"Debian's {DEBIAN_SUITE} InRelease lists no {name}")
    data = _download(f"{DEBIAN_MIRROR}/dists/{DEBIAN_SUITE}/{name}")
    if hashlib.sha256(data).hexdigest() != match.group(1):
        raise VlmcError(f"{name} does not match the sha256 in the signed InRelease")
    index = {}
    for block in lzma.decompress(data).decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if line and not line[0].isspace() and ": " in line)
        if "Package" in fields:
            index[fields["Package"]] = fields
    return index


def resolve_packages(index: dict[str, dict], roots=SYSROOT_ROOTS) -> list[str]:
    """The roots and everything they depend on (first alternative of each dependency)."""
    seen: list[str] = []
    stack = list(roots)
    while stack:
        name = stack.pop()
        if name in seen or name in SYSROOT_SKIP:
            continue
        if name not in index:
            raise VlmcError(f"Debian {DEBIAN_SUITE} arm64 has no package {name!r}")
        seen.append(name)
        for field in ("Pre-Depends", "Depends"):
            for dep in filter(None, (d.strip() for d in index[name].get(field, "").split(","))):
                stack.append(re.split(r"[ (:]", dep.split("|")[0].strip())[0])
    return sorted(seen)


def host_runtime_versions() -> dict[str, dict[str, str]]:
    """Each guest runtime the host has: record key -> {distribution: version}."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for key, distributions in GUEST_RUNTIMES.items():
        try:
            found[key] = {d: version(d) for d in distributions}
        except PackageNotFoundError:
            continue
    return found


def _guest_wheels(site: Path, runtimes: dict[str, dict[str, str]]) -> None:
    """aarch64 cp311 wheels of the runtimes (at the host's versions; onnxruntime's latest where the host has
    none) and vlmc.remote's imports, installed (not run) into `site`."""
    pins = [f"{d}=={v}" for versions in runtimes.values() for d, v in versions.items()]
    if "onnxruntime" not in runtimes:
        pins.append("onnxruntime")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile",
           "--target", str(site), "--only-binary=:all:", "--implementation", "cp", "--python-version", "3.11",
           "--platform", "manylinux_2_28_aarch64", "--platform", "manylinux_2_27_aarch64",
           "--platform", "manylinux_2_17_aarch64", "--platform", "manylinux2014_aarch64", *pins, *GUEST_WHEELS]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise VlmcError(f"pip could not fetch the aarch64 wheels: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    for path in TVM_BUILD_ONLY:
        target = site / path
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)


def precompile(sysroot: Path) -> None:
    """Compile the guest's standard library and wheels to bytecode here, once: the guest imports them from
    source on every run otherwise (it cannot keep what it compiles: PYTHONDONTWRITEBYTECODE), and emulated
    compiling made a one-iteration `vlmc profile --runtime tvm` of the built-in model 22 s instead of 18 s."""
    import compileall

    for folder in (sysroot / "usr" / "lib" / "python3.11", sysroot / "site"):
        compileall.compile_dir(str(folder), quiet=2, workers=0)  # a few py2-era test files fail: skipped


def recorded_runtimes(info: dict) -> dict[str, str]:
    """The guest runtimes a set-up record names: key -> version."""
    return {key: info[key] for key in GUEST_RUNTIMES if info.get(key)}


def setup(sysroot: Path | None = None, progress: Callable[[str], None] = lambda m: None, force: bool = False) -> dict:
    """Build the emulated user space into `sysroot` (atomically: a half-built one never takes its place). One
    built for other runtime versions than the host's (the host upgraded, or gained TVM) is rebuilt."""
    if shutil.which("dpkg-deb") is None:
        raise VlmcError("unpacking Debian packages needs dpkg-deb (a Debian or Ubuntu host)")
    runtimes = host_runtime_versions()
    wanted = {"onnxruntime": "latest", **{key: versions[GUEST_RUNTIMES[key][0]] for key, versions in runtimes.items()}}

    def build(staging: Path) -> dict:
        progress(f"Debian {DEBIAN_SUITE} arm64: checking the signed package index")
        index = _signed_index()
        packages = resolve_packages(index)
        for i, name in enumerate(packages, 1):
            entry = index[name]
            progress(f"[{i}/{len(packages)}] {name} {entry['Version']}")
            data = _download(f"{DEBIAN_MIRROR}/{entry['Filename']}")
            if hashlib.sha256(data).hexdigest() != entry["SHA256"]:
                raise VlmcError(f"{entry['Filename']} does not match the sha256 of the signed index")
            deb = staging / "package.deb"
            deb.write_bytes(data)
            unpacked = subprocess.run(["dpkg-deb", "-x", str(deb), str(staging)], capture_output=True, text=True)
            deb.unlink()
            if unpacked.returncode != 0:
                raise VlmcError(f"dpkg-deb could not unpack {name}: {unpacked.stderr.strip()}")
        progress(f"PyPI: aarch64 wheels of {', '.join(['onnxruntime', *(k for k in runtimes if k != 'onnxruntime')])}, "
                 f"{', '.join(GUEST_WHEELS)}")
        _guest_wheels(staging / "site", runtimes)
        if sys.implementation.cache_tag == GUEST_CACHE_TAG:
            progress("bytecode of the guest's Python files (this host's Python writes the same format)")
            precompile(staging)
        return {"debian": DEBIAN_SUITE, "packages": {n: index[n]["Version"] for n in packages},
                "python": GUEST_PYTHON, **wanted}

    return set_up(Path(sysroot or default_sysroot()), build, force, stale=lambda info: recorded_runtimes(info) != wanted)


# --- the device ---------------------------------------------------------------------------------------------

class QemuDevice(RemoteProcessDevice):
    timeout_s = 1800.0
    probe_timeout_s = 120.0

    def __init__(self, config: DeviceConfig):
        super().__init__(config)
        self.cpu = config.get("cpu", DEFAULT_CPU)
        if self.cpu not in CPUS:
            raise VlmcError(f"device {config.name}: unknown cpu {self.cpu!r} (one of {', '.join(CPUS)})")
        self.sysroot = Path(expand(config.get("sysroot")) or default_sysroot())
        self.timeout_s = float(config.get("timeout_s", self.timeout_s))

    def ensure_ready(self) -> None:
        if qemu_binary() is None:
            raise VlmcError("qemu-aarch64: qemu's user-mode emulator is not installed (apt-get install qemu-user)")
        if not is_set_up(self.sysroot):
            raise VlmcError(f"qemu-aarch64: no emulated user space at {self.sysroot} (run `vlmc devices setup qemu-aarch64`)")
        if shutil.which("unshare") is None:
            raise VlmcError("qemu-aarch64: showing the emulated CPU's /proc/cpuinfo needs unshare (util-linux)")
        self._host_files()

    def _host_files(self) -> None:
        """The emulated CPU's cpuinfo and a link to this host's vlmc package (pure Python, shared with the guest)."""
        import vlmc

        cpuinfo = self.sysroot / f"cpuinfo.{self.cpu}"
        text = cpuinfo_text(self.cpu, os.cpu_count() or 1)
        if not cpuinfo.is_file() or cpuinfo.read_text() != text:
            cpuinfo.write_text(text)
        link_dir = self.sysroot / "host-vlmc"
        link_dir.mkdir(exist_ok=True)
        package = Path(vlmc.__file__).resolve().parent
        link = link_dir / "vlmc"
        if not link.is_symlink() or Path(os.readlink(link)) != package:
            temp = link_dir / f".vlmc-{os.getpid()}"
            temp.unlink(missing_ok=True)
            temp.symlink_to(package)
            os.replace(temp, link)

    @property
    def remote_argv(self) -> list[str]:
        python_path = f"{self.sysroot / 'site'}:{self.sysroot / 'host-vlmc'}"
        qemu = [qemu_binary() or "qemu-aarch64", "-cpu", self.cpu, "-L", str(self.sysroot),
                "-E", f"PYTHONPATH={python_path}", "-E", "PYTHONNOUSERSITE=1", "-E", "PYTHONDONTWRITEBYTECODE=1",
                "-E", "TVM_USE_RUNTIME_LIB=1",
                "-U", "PYTHONHOME", "-U", "VIRTUAL_ENV", str(self.sysroot / GUEST_PYTHON), "-m", "vlmc.remote"]
        unshare = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "--mount", "--map-root-user"]
        return [*unshare, "sh", "-c", MOUNT_AND_EXEC, "sh", str(self.sysroot / f"cpuinfo.{self.cpu}"), *qemu]

    def describe_failure(self, returncode: int, stderr: str) -> str:
        lines = stderr.strip().splitlines()
        if lines and lines[0].startswith("unshare:") or "mount:" in stderr:
            return ("qemu-aarch64: could not give the emulator its own /proc/cpuinfo (a private mount namespace is "
                    f"refused here: {lines[0] if lines else '?'}); run as root or allow user namespaces")
        if "No module named" in stderr:
            return f"qemu-aarch64: the emulated Python lacks a module ({lines[-1]}); rerun `vlmc devices setup qemu-aarch64 --force`"
        if "Illegal instruction" in stderr:
            return (f"qemu-aarch64: the emulated {self.cpu} met an instruction it lacks: the bundle's aarch64 code targets a "
                    "newer CPU (recipe field 'tvm.aarch64_mcpu'; the device setting 'cpu')")
        return f"qemu-aarch64: the emulated run failed: {lines[-1] if lines else f'exit status {returncode}'}"

    def _check_runtime(self, bundle, runtime: str) -> None:
        """onnxruntime and TVM run here; TVM only from a user space that has its runtime and a bundle with an
        aarch64 build."""
        if runtime == "executorch":
            raise VlmcError("qemu-aarch64 runs onnxruntime and tvm, not executorch: ExecuTorch's Python runtime links "
                            "libtorch, whose aarch64 wheel on PyPI is a CUDA build (several GB of CUDA libraries to load)")
        if runtime == "tvm" and is_set_up(self.sysroot):  # (no user space at all: ensure_ready says so)
            if "tvm" not in recorded_runtimes(json.loads((self.sysroot / MARKER).read_text())):
                raise VlmcError("qemu-aarch64: the emulated user space has no TVM runtime (set up before TVM was offered, "
                                "or on a host without TVM): rerun `vlmc devices setup qemu-aarch64`")
            from vlmc.runtimes.tvm_runner import pick_library

            for entry in bundle.programs("tvm").values():
                pick_library(entry, "aarch64")

    def generate(self, bundle, runtime, prompt, pixels, max_new_tokens, with_logits=False):
        self._check_runtime(bundle, runtime)
        return super().generate(bundle, runtime, prompt, pixels, max_new_tokens, with_logits)

    def check(self) -> dict:
        result = super().check()
        return {**result, "machine": f"{result['machine']} ({self.cpu}, emulated by qemu-user)"}

    def profile(self, bundle, runtime, warmup, iterations, ops, new_tokens, progress, curve=None):
        self._check_runtime(bundle, runtime)
        result = super().profile(bundle, runtime, warmup, iterations, ops, new_tokens, progress, curve)
        result["emulated"] = True
        result["note"] = (f"qemu-aarch64 emulating a {self.cpu}: these are the ARM kernels' numerics; "
                          "the timings are an emulator's, not a cost signal")
        return result
