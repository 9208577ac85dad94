"""Build the guest image: Debian's kernel plus an initramfs of busybox and our programs.

The kernel is Debian's ``linux-image-amd64`` (6.1 on Debian 12), fetched with
``apt-get download`` and unpacked with ``dpkg -x``; it is never installed on the host.
The initramfs holds busybox-static, the virtio modules, ``guest/init/init``, the static
workload programs built from ``guest/src`` and whatever the user adds.

A build is keyed by a digest of every input (kernel package version, busybox, each guest
source, each added file and the custom command). When the digest matches the image on disk,
the build is a cache hit and costs a few hashes.

Beside ``vmlinuz`` the image holds ``vmlinux``, the same kernel uncompressed (an ELF with
a PVH entry point), which QEMU boots directly: under TCG, unpacking the 8 MB bzImage took
about 7 s of every boot's 13. It is derived from ``vmlinuz`` alone, so an image built
before it existed gets it on its next build, in place, with the same digest.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import shutil
import struct
import subprocess
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from livemig import paths
from livemig.errors import SetupError

# Bump when the layout of the image changes in a way the inputs do not show.
BUILDER_VERSION = 1
KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX = Path("/bin/busybox")
# In load order; guest/init/init loads them in the same order.
GUEST_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_console",
)
GUEST_PROGRAMS = ("lm-echo", "lm-agent", "lm-game", "lm-mmuncher")
DEFAULT_IMAGE = "default"


def guest_source_dir() -> Path:
    """``guest/`` of the checkout this package runs from (``make setup`` installs editable)."""
    override = os.environ.get("LIVEMIG_GUEST_SRC")
    root = Path(override) if override else Path(__file__).resolve().parents[3] / "guest"
    if not (root / "init" / "init").is_file():
        raise SetupError(f"guest sources not found at {root}; run livemig from its checkout")
    return root


@dataclass(frozen=True)
class Addition:
    """A user's file for the image: ``--add SRC:DEST``."""

    source: Path
    dest: str

    @classmethod
    def parse(cls, spec: str) -> Addition:
        source, sep, dest = spec.partition(":")
        if not sep or not source or not dest.startswith("/"):
            raise SetupError(f"--add takes SRC:DEST with an absolute DEST, not {spec!r}")
        path = Path(source)
        if not path.is_file():
            raise SetupError(f"--add: {source} is not a file")
        if ".." in dest.split("/"):  # it would land outside the image, on the host
            raise SetupError(f"--add: {dest} must not contain '..'")
        if dest.rstrip("/") in {"", "/init", "/bin/busybox"}:
            raise SetupError(f"--add: {dest} belongs to the image itself")
        return cls(path, dest)


@dataclass(frozen=True)
class Recipe:
    name: str = DEFAULT_IMAGE
    additions: tuple[Addition, ...] = ()
    run: str | None = None

    def __post_init__(self) -> None:
        # The name is a directory under the image cache, replaced on a rebuild.
        paths.check_name(self.name, "image name")


@dataclass(frozen=True)
class Image:
    name: str
    directory: Path
    digest: str
    kernel_package: str
    run: str | None = None
    additions: list[str] = field(default_factory=list)

    @property
    def kernel(self) -> Path:
        """What QEMU boots: the uncompressed kernel if the image has one (see the module
        docstring), else the bzImage."""
        vmlinux = self.directory / "vmlinux"
        return vmlinux if vmlinux.is_file() else self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    @classmethod
    def load(cls, name: str = DEFAULT_IMAGE) -> Image:
        paths.check_name(name, "image name")
        manifest = paths.images_dir() / name / "manifest.json"
        try:
            data = json.loads(manifest.read_text())
            return cls(
                name=name,
                directory=manifest.parent,
                digest=data["digest"],
                kernel_package=data["kernel_package"],
                run=data.get("run"),
                additions=data.get("additions", []),
            )
        except FileNotFoundError:
            raise SetupError(
                f"no image named {name!r}; build it with 'livemig image build --name {name}'"
            ) from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SetupError(
                f"image {name!r} has a damaged manifest ({exc!r}); rebuild it with "
                f"'livemig image build --name {name} --force'"
            ) from exc


@dataclass(frozen=True)
class BuildResult:
    image: Image
    cache_hit: bool
    seconds: float


def _run(argv: list[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=True)
    except FileNotFoundError as exc:
        raise SetupError(f"{argv[0]} is not installed; run 'make setup'") from exc
    except subprocess.CalledProcessError as exc:
        raise SetupError(f"{' '.join(argv)} failed: {exc.stderr.strip()[-500:]}") from exc
    return done.stdout


def _is_static(path: Path) -> bool:
    # ldd says "not a dynamic executable" (exit 1) for static binaries and non-ELF files.
    done = subprocess.run(["ldd", str(path)], capture_output=True, text=True)
    return done.returncode != 0


@dataclass(frozen=True)
class KernelPackage:
    name: str
    version: str

    @property
    def key(self) -> str:
        return f"{self.name}_{self.version}"


def resolve_kernel_package() -> KernelPackage:
    """The kernel package behind Debian's meta-package, per the host's apt lists."""
    depends = _run(["apt-cache", "depends", KERNEL_META_PACKAGE])
    names = [
        line.split(":", 1)[1].strip()
        for line in depends.splitlines()
        if line.strip().startswith("Depends:") and "linux-image-" in line
    ]
    if not names:
        raise SetupError(
            f"apt knows no {KERNEL_META_PACKAGE}; run 'apt-get update' (make setup does it)"
        )
    show = _run(["apt-cache", "show", "--no-all-versions", names[0]])
    version = next(
        (ln.split(":", 1)[1].strip() for ln in show.splitlines() if ln.startswith("Version:")),
        None,
    )
    if version is None:
        raise SetupError(f"apt-cache shows no version of {names[0]}")
    return KernelPackage(names[0], version)


def fetch_kernel(package: KernelPackage, log: Callable[[str], None]) -> Path:
    """vmlinuz and the guest's modules, unpacked once into the kernel cache."""
    unpacked = paths.kernel_cache_dir() / package.key
    if (unpacked / "vmlinuz").is_file():
        return unpacked
    log(f"fetching {package.name} {package.version}")
    paths.kernel_cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=paths.kernel_cache_dir()) as tmp:
        work = Path(tmp)
        _run(["apt-get", "download", f"{package.name}={package.version}"], cwd=work)
        debs = list(work.glob("*.deb"))
        if len(debs) != 1:
            raise SetupError(f"apt-get download of {package.name} gave {len(debs)} files")
        _run(["dpkg", "-x", str(debs[0]), str(work / "root")])
        staged = work / "staged"
        (staged / "modules").mkdir(parents=True)
        (vmlinuz,) = (work / "root" / "boot").glob("vmlinuz-*")
        shutil.copy(vmlinuz, staged / "vmlinuz")
        found = {p.stem: p for p in (work / "root" / "lib" / "modules").rglob("*.ko")}
        for module in GUEST_MODULES:
            if module not in found:
                raise SetupError(f"{package.name} has no module {module}.ko")
            shutil.copy(found[module], staged / "modules" / f"{module}.ko")
        staged.rename(unpacked)
    return unpacked


def uncompressed_kernel(bzimage: bytes) -> bytes | None:
    """The ELF kernel inside a bzImage (its payload, per the boot protocol's header), or
    None if it is packed in a way we do not unpack (zstd, lz4, ...)."""
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        return None
    if struct.unpack_from("<H", bzimage, 0x206)[0] < 0x208:
        return None  # no payload fields before boot protocol 2.08
    setup_sectors = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sectors + 1) * 512 + offset
    payload = bzimage[start:start + length]
    unpacker: lzma.LZMADecompressor | zlib._Decompress
    if payload.startswith(b"\xfd7zXZ\x00"):
        unpacker = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    elif payload.startswith(b"\x1f\x8b"):
        unpacker = zlib.decompressobj(wbits=31)  # gzip
    else:
        return None
    try:
        elf = unpacker.decompress(payload)
    except (lzma.LZMAError, zlib.error):
        return None
    # A cut payload unpacks to a prefix without an error: only a whole stream will do.
    return elf if unpacker.eof and elf.startswith(b"\x7fELF") else None


def _add_vmlinux(directory: Path) -> None:
    """``vmlinux`` beside ``vmlinuz`` in ``directory``, if it can be unpacked; written
    atomically, so a QEMU starting meanwhile boots one kernel file or the other."""
    if (directory / "vmlinux").is_file():
        return
    elf = uncompressed_kernel((directory / "vmlinuz").read_bytes())
    if elf is None:
        return  # QEMU boots the bzImage, only more slowly
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".vmlinux.", delete=False) as tmp:
        tmp.write(elf)
    os.chmod(tmp.name, 0o644)
    os.replace(tmp.name, directory / "vmlinux")


def _digest(recipe: Recipe, package: KernelPackage, guest: Path) -> str:
    h = hashlib.sha256()

    def feed(label: str, data: bytes) -> None:
        h.update(f"{label}\0{len(data)}\0".encode())
        h.update(data)

    feed("builder", str(BUILDER_VERSION).encode())
    feed("kernel", package.key.encode())
    feed("busybox", BUSYBOX.read_bytes())
    for path in sorted(p for p in guest.rglob("*") if p.is_file() and "build" not in p.parts):
        feed(f"guest:{path.relative_to(guest)}", path.read_bytes())
    for add in recipe.additions:
        feed(f"add:{add.dest}", add.source.read_bytes())
    feed("run", (recipe.run or "").encode())
    return h.hexdigest()


def _install(src: Path, root: Path, dest: str, mode: int = 0o755) -> None:
    target = root / dest.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, target)
    target.chmod(mode)


def _write_initramfs(root: Path, out: Path) -> None:
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    listing = "\n".join([".", *names]).encode() + b"\n"
    cpio = subprocess.run(
        ["cpio", "--quiet", "-o", "-H", "newc", "--owner=0:0"],
        cwd=root,
        input=listing,
        capture_output=True,
        check=False,
    )
    if cpio.returncode != 0:
        raise SetupError(f"cpio failed: {cpio.stderr.decode(errors='replace').strip()}")
    # Level 1: the guest decompresses under TCG, where every cycle is slow.
    out.write_bytes(gzip.compress(cpio.stdout, compresslevel=1))


def build(
    recipe: Recipe | None = None, *, force: bool = False, log: Callable[[str], None] = print
) -> BuildResult:
    recipe = recipe or Recipe()
    started = time.monotonic()
    guest = guest_source_dir()
    if not BUSYBOX.is_file() or not _is_static(BUSYBOX):
        raise SetupError(f"{BUSYBOX} is missing or not static; install busybox-static")
    for add in recipe.additions:
        if add.source.stat().st_mode & 0o111 and not _is_static(add.source):
            log(f"warning: {add.source} is dynamically linked; the guest has no libc")
    package = resolve_kernel_package()
    digest = _digest(recipe, package, guest)
    target = paths.images_dir() / recipe.name
    if not force:
        try:
            existing = Image.load(recipe.name)
        except SetupError:
            existing = None
        if existing is not None and existing.digest == digest and existing.initrd.is_file():
            _add_vmlinux(existing.directory)  # an image from before it had one
            return BuildResult(existing, cache_hit=True, seconds=time.monotonic() - started)

    kernel = fetch_kernel(package, log)
    log(f"building image {recipe.name!r}")
    paths.images_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=paths.images_dir()) as tmp:
        work = Path(tmp)
        _run(["make", "-s", "-C", str(guest / "src"), f"OUT={work / 'programs'}"])
        root = work / "root"
        _install(BUSYBOX, root, "/bin/busybox")
        _install(guest / "init" / "init", root, "/init")
        _install(guest / "init" / "cgi-dyn", root, "/etc/livemig/cgi-dyn")
        _install(guest / "init" / "cgi-post", root, "/etc/livemig/cgi-post")
        for module in GUEST_MODULES:
            _install(kernel / "modules" / f"{module}.ko", root, f"/lib/modules/{module}.ko", 0o644)
        for program in GUEST_PROGRAMS:
            _install(work / "programs" / program, root, f"/usr/bin/{program}")
        for add in recipe.additions:
            _install(add.source, root, add.dest, add.source.stat().st_mode & 0o777)
        if recipe.run is not None:
            (root / "etc/livemig/run.sh").write_text(f"#!/bin/sh\nexec {recipe.run}\n")
        staged = work / "image"
        staged.mkdir()
        shutil.copy(kernel / "vmlinuz", staged / "vmlinuz")
        _add_vmlinux(staged)
        _write_initramfs(root, staged / "initrd.img")
        image = Image(
            name=recipe.name,
            directory=target,
            digest=digest,
            kernel_package=package.key,
            run=recipe.run,
            additions=[f"{a.source}:{a.dest}" for a in recipe.additions],
        )
        manifest = {k: v for k, v in asdict(image).items() if k not in {"name", "directory"}}
        (staged / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)
    return BuildResult(image, cache_hit=False, seconds=time.monotonic() - started)
