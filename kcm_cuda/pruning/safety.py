"""What keeps the user's files safe and a broken model from being saved.

- :func:`check_output_path`: an output that is an input (the model directory, the tokenizer
  directory, the data file), contains one or lies inside one is refused, whatever
  ``overwrite`` says. Paths are compared by identity (device + inode of every existing
  ancestor), so links, ``..`` and relative spellings cannot slip through.
- :func:`output_lock`: one writer per output directory at a time. An ``flock`` on
  ``.<name>.kcm-lock`` next to the output: a second writer fails at once with
  :class:`OutputBusyError`; the kernel releases the lock when the holder dies (even by
  SIGKILL), so a stale lock file never blocks anyone. Re-entrant within one thread
  (``kcm-prune`` holds it for the whole run, ``save_pruned`` takes it again).
- :func:`publish`: moves a finished temporary directory into place. A new output: one
  ``rename`` that never replaces (``renameat2(RENAME_NOREPLACE)``). An existing one
  (``overwrite``): an atomic exchange (``renameat2(RENAME_EXCHANGE)``), so the path holds
  either the complete old output or the complete new one at every instant; where the kernel
  or file system lacks it, the old output is renamed aside, the new one renamed in, and a
  crash in between is repaired by the next save (:func:`clean_stale` puts the old one back).
- :func:`check_finite`: every floating-point parameter finite, else one line naming the tensor.
- :func:`finite_refit`: a refit whose result is not finite falls back to plain pruning.
- :func:`check_free_space`, :func:`save_error`: a full or read-only disk is a one-line error
  that says the output was left unchanged.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path

import torch
from torch import nn

TMP_TAG = ".tmp-"  # .<name>.tmp-XXXX: a save in progress (or one that died)
OLD_TAG = ".old-"  # .<name>.old-XXXX/old: the old output set aside (fallback path only)
LOCK_SUFFIX = ".kcm-lock"
SOURCES_ATTR = "kcm_source_dirs"  # on a pruned model: the input model's directories


class UnsafeOutputError(ValueError):
    """The output would overwrite or sit inside one of the inputs."""


class OutputBusyError(FileExistsError):
    """Another process (or thread) is writing the same output."""


class SaveError(OSError):
    """Writing the output failed (disk full, read-only, ...); the output is unchanged."""


# -- the output is never an input -----------------------------------------------------------
def _ident(p: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(p)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _self_and_ancestors(p: Path) -> Iterator[Path]:
    p = Path(os.path.abspath(p))
    yield p
    yield from p.parents


def _same(a: Path, b: Path) -> bool:
    ia, ib = _ident(a), _ident(b)
    return ia is not None and ia == ib


def model_sources(model: object) -> list[Path]:
    """The local directory ``model`` was loaded from (``config._name_or_path`` /
    ``name_or_path``; a relative name is resolved against the current directory, so prune()
    records the resolved directories on the pruned model too), and for a hub name its
    snapshot in the local hub cache, when known."""
    names = {
        getattr(model, "name_or_path", None),
        getattr(getattr(model, "config", None), "_name_or_path", None),
    }
    out: list[Path] = [Path(p) for p in getattr(model, SOURCES_ATTR, ())]  # set by prune()
    for name in names:
        if not isinstance(name, (str, os.PathLike)) or not str(name):
            continue
        p = Path(name).expanduser()
        if p.is_dir():
            out.append(p.resolve())
            continue
        try:  # a hub name: its cached snapshot directory
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(str(name), "config.json")
            if isinstance(hit, str):
                out.append(Path(hit).parent)
        except Exception:  # noqa: BLE001 - not a hub name, or no hub library: nothing to protect
            pass
    return out


def check_output_path(
    output: str | os.PathLike,
    inputs: Mapping[str, str | os.PathLike | None] | Iterable[str | os.PathLike | None],
    *,
    allow_contains: bool = False,
) -> None:
    """UnsafeOutputError when ``output`` is one of ``inputs`` (a name → path mapping, or paths
    of input models), contains one (unless ``allow_contains``: for outputs that only add files,
    never replace the directory), or lies inside one. Missing inputs are skipped."""
    items = inputs.items() if isinstance(inputs, Mapping) else (("input model", p) for p in inputs)
    out = Path(output).expanduser()
    for what, raw in items:
        if raw is None or not str(raw):
            continue
        inp = Path(raw).expanduser()
        if _ident(inp) is None:
            continue
        shown = os.path.abspath(inp)
        if inp.is_dir() and not what.endswith("directory"):
            what = f"{what} directory"
        if _same(out, inp):
            raise UnsafeOutputError(
                f"output {out} is the {what} {shown}: choose another output (the inputs are "
                "never modified, --overwrite / overwrite=True or not)"
            )
        if not allow_contains and any(_same(a, out) for a in _self_and_ancestors(inp)):
            raise UnsafeOutputError(
                f"output {out} contains the {what} {shown}: replacing it would delete the input; "
                "choose another output"
            )
        if inp.is_dir() and any(_same(a, inp) for a in _self_and_ancestors(out)):
            raise UnsafeOutputError(
                f"output {out} lies inside the {what} {shown}: the inputs are never "
                "modified; choose an output outside it"
            )


def prepare_output(output: str | os.PathLike, *, overwrite: bool) -> list[Path]:
    """Check, before any long step, that ``output`` can be written, and create its missing
    parent directories (so that its lock can be taken now: two runs on one new output are
    refused at once). Returns the directories created, for :func:`remove_created` after a
    failure. UnsafeOutputError / SaveError / FileExistsError, one line each, for: the current
    directory or one of its ancestors (a replaced output is deleted), an existing file, an
    existing output without ``overwrite``, a name too long for the file system (with the
    temporary names the save uses), a parent path through a file, a parent not writable."""
    out = Path(output).expanduser()
    if not out.name or out.name in (".", ".."):
        raise UnsafeOutputError(
            f"output {output!s} names no directory: give a new directory's path"
        )
    here = Path.cwd()
    if any(_same(a, out) for a in _self_and_ancestors(here)):
        raise UnsafeOutputError(
            f"output {out} is the current directory or contains it: replacing it would delete "
            "it; choose a new directory"
        )
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise FileExistsError(f"output {out} exists and is not a directory")
        if not overwrite:
            raise FileExistsError(
                f"output directory {out} already exists (use --overwrite / overwrite=True)"
            )
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SaveError(f"cannot create the output {out}: {ancestor} is not a directory")
    try:
        limit = os.pathconf(ancestor, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    longest = len(os.fsencode(f".{out.name}{OLD_TAG}XXXXXXXX"))
    if longest > limit:
        raise SaveError(
            f"output name {out.name[:40]}… is too long: with the save's temporary names it needs "
            f"{longest} bytes, the file system allows {limit}"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise SaveError(f"cannot write the output in {ancestor}: Permission denied")
    created = []
    missing = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            remove_created(created)
            raise save_error(exc, out, where=d.parent) from None
        created.append(d)
    return created


def remove_created(created: list[Path]) -> None:
    """Remove the directories :func:`prepare_output` created, deepest first, when still empty."""
    for d in reversed(created):
        with suppress(OSError):
            d.rmdir()


# -- one writer per output ------------------------------------------------------------------
_held: dict[str, tuple[int, int]] = {}  # lock path → (thread id, depth)
_held_guard = threading.Lock()


def lock_path(target: Path) -> Path:
    parent = Path(os.path.realpath(Path(target).expanduser().parent))
    return parent / f".{Path(target).name}{LOCK_SUFFIX}"


@contextmanager
def output_lock(target: str | os.PathLike, *, missing_parent_ok: bool = False) -> Iterator[None]:
    """Hold the write lock of output directory ``target`` (see the module docstring).
    ``missing_parent_ok``: when the parent directory does not exist yet, take no lock (the
    save creates the parent and takes it then)."""
    import fcntl

    lp = lock_path(Path(target))
    key = str(lp)
    me = threading.get_ident()
    with _held_guard:
        owner = _held.get(key)
        if owner is not None:
            if owner[0] != me:
                raise OutputBusyError(
                    f"output {target} is being written by another thread of this process"
                )
            _held[key] = (me, owner[1] + 1)
    if owner is not None:
        try:
            yield
        finally:
            with _held_guard:
                _held[key] = (me, _held[key][1] - 1)
        return
    if missing_parent_ok and not lp.parent.is_dir():
        yield
        return
    while True:
        fd = _open_lock_file(lp, Path(target))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                who = f"another process (pid {holder})" if holder else "another process"
                raise OutputBusyError(
                    f"output {target} is being written by {who} right now: wait for it to "
                    "finish or choose another output"
                ) from None
            raise save_error(exc, Path(target), where=lp.parent) from None
        # the holder we waited for may have unlinked the file: lock the file at the path
        if _same_fd(fd, lp):
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError:
        pass  # the pid is for the message only
    with _held_guard:
        _held[key] = (me, 1)
    try:
        yield
    finally:
        with _held_guard:
            depth = _held[key][1] - 1
            if depth:
                _held[key] = (me, depth)
            else:
                del _held[key]
        if not depth:
            with suppress(OSError):
                os.unlink(lp)  # while still locked: a waiter re-checks the inode
            os.close(fd)


def files_follow_umask(root: Path) -> None:
    """Give every regular file under ``root`` the mode a plain ``open`` would (0666 less the
    umask): writers such as transformers' safetensors save and ``mkstemp`` create 0600."""
    mode = 0o666 & ~current_umask()
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            f = Path(dirpath) / name
            if f.is_file() and not f.is_symlink():
                os.chmod(f, mode)


def current_umask() -> int:
    """The process's file-mode creation mask (read without changing it where Linux says it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _open_lock_file(lp: Path, target: Path) -> int:
    """Open (create) the lock file without following a link planted at its name: a symbolic
    link (O_NOFOLLOW), a second hard link or anything but a regular file there is refused, so
    the PID written into it can never land in another file."""
    import stat

    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(lp, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeOutputError(
                f"the lock file {lp} of output {target} is a symbolic link: refusing to follow "
                "it (remove it if no kcm-prune is writing this output)"
            ) from None
        raise save_error(exc, target, where=lp.parent) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        what = "not a regular file" if not stat.S_ISREG(st.st_mode) else "a hard link"
        raise UnsafeOutputError(
            f"the lock file {lp} of output {target} is {what}: refusing to write into it "
            "(remove it if no kcm-prune is writing this output)"
        )
    return fd


def _same_fd(fd: int, p: Path) -> bool:
    st = os.fstat(fd)
    return _ident(p) == (st.st_dev, st.st_ino)


def _read_pid(fd: int) -> int | None:
    try:
        raw = os.pread(fd, 32, 0).decode().strip()
        return int(raw) if raw.isdigit() else None
    except (OSError, ValueError):
        return None


# -- moving a finished output into place ----------------------------------------------------
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2); False where the C library, kernel or file system lacks it (then the
    caller falls back), an OSError for a real failure (e.g. EEXIST for NOREPLACE)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def publish(tmp: Path, target: Path, *, overwrite: bool) -> None:
    """Move the finished directory ``tmp`` to ``target`` (see the module docstring)."""
    if not target.exists():
        try:
            if _renameat2(tmp, target, _RENAME_NOREPLACE):
                return
        except FileExistsError:
            pass
        else:
            if not target.exists():
                os.rename(tmp, target)
                return
        raise FileExistsError(
            f"output {target} was created by someone else while this save was running; "
            "left as it is (nothing replaced)"
        )
    if not overwrite:
        raise FileExistsError(
            f"output {target} was created by someone else while this save was running; "
            "left as it is (nothing replaced)"
        )
    if _renameat2(tmp, target, _RENAME_EXCHANGE):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old output
        return
    import tempfile

    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}{OLD_TAG}", dir=target.parent))
    os.replace(target, trash / "old")
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(trash / "old", target)
        trash.rmdir()
        raise
    shutil.rmtree(trash, ignore_errors=True)


def clean_stale(target: Path) -> None:
    """With the output's lock held: put back an old output left aside by a save that died
    between its two renames (fallback path), and remove the temporary directories of saves
    that died (no live writer can own them: it would hold the lock)."""
    parent, name = target.parent, target.name
    if not parent.is_dir():
        return
    olds = sorted(parent.glob(f".{glob_escape(name)}{OLD_TAG}*"), key=lambda p: p.stat().st_mtime)
    if not target.exists():
        for d in reversed(olds):
            if (d / "old").is_dir():
                os.replace(d / "old", target)
                break
    for d in [*olds, *parent.glob(f".{glob_escape(name)}{TMP_TAG}*")]:
        shutil.rmtree(d, ignore_errors=True)


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


# -- disk full, read-only -------------------------------------------------------------------
def save_error(exc: BaseException, target: Path, *, where: Path | None = None) -> SaveError:
    """A one-line SaveError for a failed write (OSError, or safetensors' own error, which
    carries the OS error as text: '... I/O error: No space left on device (os error 28)')."""
    code = getattr(exc, "errno", None)
    if code is None:
        m = re.search(r"os error (\d+)", str(exc))
        code = int(m.group(1)) if m else None
    what = os.strerror(code) if code else (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    place = where if where is not None else target.parent
    left = f"{target} is unchanged" if target.exists() else "nothing was written"
    err = SaveError(f"cannot write the output in {place}: {what} ({left})")
    err.errno = code
    return err


def model_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in model.state_dict().values():
        if t.device.type == "meta" or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def check_free_space(directory: Path, model: nn.Module, target: Path) -> None:
    """SaveError before writing anything when ``directory`` has clearly too little room."""
    need = model_bytes(model)
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return
    if free < need:
        left = f"{target} is unchanged" if target.exists() else "nothing was written"
        raise SaveError(
            f"not enough free space in {directory}: the model needs about {_mb(need)}, "
            f"{_mb(free)} free ({left})"
        )


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# -- finite weights -------------------------------------------------------------------------
FINITE_CHUNK = 1 << 20  # elements per finiteness test in check_finite


def check_finite(
    model: nn.Module, *, what: str = "model", then: str = "nothing was pruned"
) -> None:
    """ValueError naming the first parameter that holds a NaN or an infinity (meta-device and
    integer parameters are skipped). One pass over the weights, in chunks of
    ``FINITE_CHUNK`` elements: the temporaries of the test stay small whatever the tensor
    (a whole-tensor isfinite of a 32000 × 4096 embedding would take several times its bool
    size on top of the weights)."""
    source = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    for name, p in model.named_parameters():
        if p.device.type == "meta" or not p.is_floating_point():
            continue
        with torch.no_grad():
            flat = p.detach().reshape(-1)
            if all(bool(torch.isfinite(c).all()) for c in flat.split(FINITE_CHUNK)):
                continue
            bad = ~torch.isfinite(p)  # the error path: the details, whole-tensor
            n_bad = int(bad.sum())
            n_nan = int(torch.isnan(p).sum())
            first = [int(i) for i in bad.nonzero()[0].tolist()]
        kinds = [f"{n_nan} NaN"] if n_nan else []
        if n_bad > n_nan:
            kinds.append(f"{n_bad - n_nan} inf")
        src = f" (loaded from {source})" if source else ""
        raise ValueError(
            f"{what} weight {name}{src} holds {n_bad} non-finite value(s) of {p.numel()} "
            f"({', '.join(kinds)}; first at index {first}): broken weights; {then}"
        )


def finite_refit(
    W: torch.Tensor, db: torch.Tensor, W0: torch.Tensor, fell_back: bool
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """A refit (W, bias change db) with a NaN or infinity falls back to plain pruning:
    (W0, 0, True)."""
    if bool(torch.isfinite(W).all()) and bool(torch.isfinite(db).all()):
        return W, db, fell_back
    return W0.double(), torch.zeros_like(db, dtype=torch.float64), True
