"""Atomic writes: a reader (or a crash) never sees a half-written file or folder.

Everything the project writes that someone else reads (checkpoints, features, tracks,
reports, tables, audio) goes through a sibling temporary path that is renamed into place
only once complete; on failure the temporary is removed and what was there before stays.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_sibling(path: Path) -> Path:
    """A hidden name beside ``path`` (same filesystem, so the rename is atomic); the pid keeps
    concurrent writers (Ray workers, Tune trials) apart. The suffix is kept so that writers
    that choose a format by extension (soundfile, matplotlib) still see it."""
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path, *, directory: bool = False, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; rename it into place on success.

    ``directory=True`` creates the temporary as an empty folder. An existing ``path`` is
    replaced (``replace=False``: kept, and the new content dropped). On an exception the
    temporary is removed and the exception propagates."""
    path = Path(path)
    # never swap a folder for a file or a file for a folder: that would delete what someone put there
    if path.exists() and path.is_dir() != directory:
        kind = "a folder" if path.is_dir() else "a file"
        raise (IsADirectoryError if path.is_dir() else NotADirectoryError)(
            f"{path}: is {kind}; not replacing it with {'a folder' if directory else 'a file'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    _remove(tmp)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if path.exists() and not replace:
            return
        if path.is_dir() and not path.is_symlink():
            # os.replace cannot swap onto a non-empty folder: move the old one aside first so
            # that a failure between the two renames still leaves one complete copy
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            _remove(old)
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)  # put the old copy back under its name
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        _remove(tmp)


def check_out_folder(path: str | Path, option: str = "--out") -> Path:
    """An output folder that can be created: refused before anything is written (so no half-made
    parents are left) when it is a file or a name is longer than the filesystem allows."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path}: exists and is not a folder")
    anchor = next((p for p in path.absolute().parents if p.is_dir()), Path("/"))
    try:
        name_max = os.pathconf(anchor, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        name_max = 255
    long = next((part for part in path.parts if len(os.fsencode(part)) > name_max), None)
    if long is not None:
        raise ValueError(f"{option} {str(path)[:80]}...: the name {long[:40]}... is longer than this filesystem "
                         f"allows ({name_max} bytes)")
    return path


def check_out_file(out: str | Path, inputs: list, option: str = "--out") -> Path:
    """An output file that can be written and overwrites none of the inputs: checked before any work."""
    out = Path(out)
    if not str(out).strip() or out.name in ("", ".", ".."):
        raise ValueError(f"{option}: need a file name, got {str(out)!r}")
    if out.is_dir():
        raise ValueError(f"{option} {out}: is a folder; give the file to write (e.g. {out / 'aligned.mid'})")
    for p in inputs:
        if out.exists() and Path(p).exists() and out.resolve() == Path(p).resolve():
            raise ValueError(f"{option} {out}: is one of the inputs; write the result to another file")
    check_out_folder(out.parent, option)
    return out


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)
