"""Atomic files and transactional folders, shared by checkpoints, reports, ONNX files and engines.

A single file goes to a temporary name in its directory, is flushed to disk and renamed over the
target. A multi-file output (a checkpoint with its optimizer state, an export with its split graphs
and report) is written into a staging folder beside the target, with a manifest of SHA-256 hashes,
and swapped in whole: on Linux with one atomic `renameat2(RENAME_EXCHANGE)`, elsewhere with two
renames whose gap the next run repairs. A crash at any point leaves the old complete output or the
new one at the target, never a mix; loaders check the manifest, so files mixed by hand are refused.

`fault_point()` marks each write and swap step. With `ALTERMOMA_FAULT_AT=N` in the environment the
N-th point ends the process at once (`os._exit`, like kill -9): the fault-injection tests use it to
crash a child process at every step and check what is left on disk.

No torch import here, so the torch-free deployment code can use it.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

MANIFEST = "manifest.json"
FAULT_ENV = "ALTERMOMA_FAULT_AT"
FAULT_EXIT = 86  # the exit status of an injected crash
_fault_count = 0


class OutputError(ValueError):
    """An output folder that cannot be written, or one whose files do not belong together."""


def fault_point() -> None:
    """One write or swap step; the `ALTERMOMA_FAULT_AT`-th of them kills the process (tests only)."""
    global _fault_count
    target = os.environ.get(FAULT_ENV)
    if target is None:
        return
    _fault_count += 1
    if _fault_count == int(target):
        os._exit(FAULT_EXIT)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)`, then rename onto `path`; on failure the old file (if any) is untouched."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output directory {path.parent} does not exist")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are meant to be shared
        fault_point()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def check_writable_folder(path: str | os.PathLike, what: str = "--out") -> Path:
    """Refuse, before any work, an output folder that is a file, lies under a file, or cannot be created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} exists and is not a directory")
    parent = path if path.exists() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{what} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {path}: {parent} is not writable")
    return path


def check_inputs_not_outputs(
    outputs: Mapping[str, str | os.PathLike | None],
    inputs: Mapping[str, str | os.PathLike | Iterable[str | os.PathLike] | None],
) -> None:
    """Refuse, before any work, an output path that is, contains or lies inside an input path.

    Outputs are swapped in whole, so `--out` equal to (or holding) `--checkpoint` would replace the
    checkpoint being read, and `--out` inside it would change the files its manifest lists. Both maps
    go from the option's name (for the message) to a path, a list of paths or None (not given); paths
    are compared resolved (symlinks, `..`, relative to the working directory).
    """
    for out_name, out in outputs.items():
        if out is None:
            continue
        target = _resolved(out)
        for in_name, given in inputs.items():
            for source in _paths(given):
                relation = _relation(target, _resolved(source))
                if relation:
                    raise OutputError(
                        f"{out_name} {out} {relation} {in_name} {source}: an output must never replace "
                        f"or change its input; choose another {out_name}"
                    )


def _paths(given: str | os.PathLike | Iterable[str | os.PathLike] | None) -> list[str | os.PathLike]:
    if given is None:
        return []
    if isinstance(given, str | os.PathLike):
        return [given]
    return [p for p in given if p is not None]


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.expanduser(os.fspath(path))).resolve()


def _relation(out: Path, source: Path) -> str | None:
    """How `out` overlaps `source` (for the message), or None when they are apart."""
    if out == source:
        return "is the same path as"
    if out in source.parents:
        return "contains"
    if source in out.parents:
        return "lies inside"
    return None


def check_replaceable(path: str | os.PathLike, kinds: tuple[str, ...], overwrite: bool = False) -> None:
    """An existing folder is replaced only if an altermoma command of one of `kinds` wrote it (its
    manifest says so) or `overwrite` is given: a typo in --out must not wipe someone's data."""
    path = check_writable_folder(path)
    if not path.exists() or overwrite or not any(path.iterdir()):
        return
    kind = read_manifest(path).get("kind") if (path / MANIFEST).is_file() else None
    if kind not in kinds:
        found = f"a {kind!r} output" if kind else "a folder altermoma did not write"
        raise OutputError(f"{path} is {found}; choose another --out or pass --overwrite")


@contextmanager
def staged_directory(path: str | os.PathLike, kind: str = "output", clean: bool = True) -> Iterator[Path]:
    """Write a multi-file output into a staging folder beside `path`, then swap it in whole.

    The block writes into the yielded folder. On success every file is fsynced, `manifest.json`
    (kind and SHA-256 of every file) is written, and the folder replaces `path` in one step. A
    failure or a crash leaves the old output at `path`; leftovers of an earlier crash are cleaned
    (or, after a crash between the two fallback renames, the old output is put back) first;
    `clean=False` leaves the cleaning to a caller that keeps its own `work_directory` beside `path`.
    """
    path = check_writable_folder(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path, clean=clean)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.staging-", dir=path.parent))
    try:
        yield staging
        files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != MANIFEST)
        for item in files:
            with open(item, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(item, 0o666 & ~_umask())  # some writers (safetensors) make 0600; results are shared
            fault_point()
        for folder in (p for p in staging.rglob("*") if p.is_dir()):
            os.chmod(folder, 0o777 & ~_umask())
        manifest = {"kind": kind, "files": {str(p.relative_to(staging)): sha256_of(p) for p in files}}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        os.chmod(staging, 0o777 & ~_umask())
        fault_point()
        _swap_in(staging, path)
        fault_point()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def work_directory(path: str | os.PathLike) -> Path:
    """A scratch folder beside `path` (same file system, so its files move into a staging folder by
    rename); cleaned by the next `recover(path)` if a crash leaves it behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.work-", dir=path.parent)).resolve()


def _swap_in(staging: Path, path: Path) -> None:
    if not path.exists():
        os.replace(staging, path)
        return
    if _exchange(staging, path):  # staging now holds the old output
        shutil.rmtree(staging, ignore_errors=True)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.replace(path, old / path.name)
    fault_point()
    os.replace(staging, path)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def recover(path: str | os.PathLike, clean: bool = True) -> list[str]:
    """Repair what a crash left beside `path`: restore an old output moved aside but not replaced,
    and (writers only, `clean`) remove stale staging folders. Returns what was done."""
    path = Path(path)
    done = []
    for old in sorted(path.parent.glob(f".{path.name}.old-*")):
        if not path.exists() and (old / path.name).is_dir():
            os.replace(old / path.name, path)
            done.append(f"restored {path} from an interrupted write")
        if clean:
            shutil.rmtree(old, ignore_errors=True)
    stale_dirs = [*path.parent.glob(f".{path.name}.staging-*"), *path.parent.glob(f".{path.name}.work-*")]
    for stale in sorted(stale_dirs) if clean else []:
        shutil.rmtree(stale, ignore_errors=True)
        done.append(f"removed the unfinished output {stale.name}")
    return done


def read_manifest(path: str | os.PathLike) -> dict:
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise OutputError(f"{path}: unreadable {MANIFEST}: {error}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise OutputError(f"{path}: {MANIFEST} is not an altermoma manifest")
    return manifest


def verify_manifest(path: str | os.PathLike, names: list[str] | None = None) -> dict:
    """Check that the files of an output (all, or `names`) are the ones its manifest lists.

    Outputs written before manifests existed (no `manifest.json`) pass unchecked.
    """
    path = Path(path)
    recover(path, clean=False)
    if not (path / MANIFEST).is_file():
        return {}
    manifest = read_manifest(path)
    for name in names if names is not None else list(manifest["files"]):
        expected = manifest["files"].get(name)
        if expected is None:
            raise OutputError(f"{path}: {name} is not part of this output (mixed files?)")
        if not (path / name).is_file():
            raise OutputError(f"{path}: {name} is missing")
        if sha256_of(path / name) != expected:
            raise OutputError(f"{path}: {name} does not match the manifest (a mixed or corrupt output)")
    return manifest


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
