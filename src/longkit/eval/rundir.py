"""What a run directory may hold, and who may write it: the run's identity, its lock, its invocation history.

A run directory's records are only comparable (and a resume only correct) when every sample in it was computed
with the same inputs. :func:`run_identity` collects every input that changes a sample's result but is not in the
sample's id (``method|task|length|depth|sample``): the model, the seed, the dtype, the prefill and perplexity
chunks... and the *contents* of every file an option or a method parameter names (a ``param(..., file=True)``), as
a SHA-256 fingerprint. A second eval into the directory may add methods, tasks, lengths, depths and samples
(the grid grows), but a different identity is refused with one line naming what changed: the records already
there would silently mix two settings, or a resume would keep results computed from an old file.

One eval at a time: :class:`RunLock` holds an ``flock`` on ``eval.lock`` for the whole eval; a second eval into
the directory fails at once, and a killed eval's lock goes with its process (the kernel releases it).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from longkit.errors import EvalError
from longkit.eval.records import RUN_FILE, load_run, write_run
from longkit.registry import params_of

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock, the rest works
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = "eval.lock"
#: Every setting that changes a recorded sample's result (and is not in its id). ``dtype`` is the resolved one.
IDENTITY_KEYS = ("model", "seed", "chat", "dtype", "attn_implementation", "device", "prefill_chunk", "ppl_chunk",
                 "haystack", "ppl_text", "suite", "data_dir", "backend", "base_url", "api_model", "tokenizer")
#: Options that may name a file or directory; when the path exists, its contents are the identity, not its name.
FILE_OPTIONS = ("model", "tokenizer", "haystack", "ppl_text", "data_dir")
#: Files above this size are fingerprinted by their size and three 4 MiB samples (start, middle, end) instead of
#: hashed whole, so a multi-GB model directory costs milliseconds; any retraining or re-quantisation changes them.
FULL_HASH_BYTES = 256 * 2**20
_BLOCK = 4 * 2**20


def fingerprint(path: str | Path) -> str:
    """SHA-256 of a file's contents, or of a directory's files (relative names and contents, sorted by name;
    hidden files skipped)."""
    path = Path(path)
    if path.is_file():
        return _file_digest(path)
    h = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = item.relative_to(path)
        if not any(part.startswith(".") for part in rel.parts):
            h.update(f"{rel.as_posix()}\0{_file_digest(item)}\0".encode())
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    size = path.stat().st_size
    h = hashlib.sha256(f"{size}\0".encode())
    with path.open("rb") as fh:
        if size <= FULL_HASH_BYTES:
            while chunk := fh.read(_BLOCK):
                h.update(chunk)
        else:
            for offset in (0, size // 2 - _BLOCK // 2, size - _BLOCK):
                fh.seek(offset)
                h.update(fh.read(_BLOCK))
    return h.hexdigest()


def _file_value(value: Any) -> Any:
    """The identity of an option value: ``{"path", "sha256"}`` for an existing file or directory, else the value
    (a model alias is a name even where a directory of that name exists: the loader reads the alias)."""
    from longkit.models import ALIASES

    if isinstance(value, str) and value and value not in ALIASES and Path(value).expanduser().exists():
        return {"path": value, "sha256": fingerprint(Path(value).expanduser())}
    return value


def method_files(specs: list[Any]) -> dict[str, dict[str, Any]]:
    """For each method combination that names files (``param(..., file=True)``), ``{"kind.param": identity}``."""
    out: dict[str, dict[str, Any]] = {}
    for spec in specs:
        files = {}
        for method in spec.methods():
            for info in params_of(type(method)):
                if info.file:
                    value = _file_value(getattr(method, info.name))
                    if isinstance(value, dict):
                        files[f"{method.kind}.{info.name}"] = value
        if files:
            out[spec.label()] = files
    return out


def run_identity(config: Any, specs: list[Any]) -> dict[str, Any]:
    """Every input of ``config`` (an EvalConfig) and of the method combinations ``specs`` that changes results:
    the :data:`IDENTITY_KEYS` (file options as content fingerprints) and ``method_files``."""
    identity = {key: getattr(config, key) for key in IDENTITY_KEYS}
    for key in FILE_OPTIONS:
        identity[key] = _file_value(identity[key])
    identity["method_files"] = method_files(specs)
    return identity


def _same(old: Any, new: Any) -> bool:
    if isinstance(old, dict) and isinstance(new, dict) and "sha256" in old and "sha256" in new:
        return old["sha256"] == new["sha256"]
    return old == new


def _shown(value: Any) -> str:
    if isinstance(value, dict) and "sha256" in value:
        return f"{value['path']!r} (sha256 {value['sha256'][:12]})"
    return repr(value)


def identity_change(old: dict[str, Any], new: dict[str, Any], skip: tuple[str, ...] = ()) -> str | None:
    """What differs between a run directory's identity and a new eval's (the end of "run directory X ..."), or None.

    A method combination's files are compared only when the directory has run that combination; new ones may join.
    """
    for key in IDENTITY_KEYS:
        if key in skip or key not in old:
            continue
        if not _same(old[key], new.get(key)):
            if isinstance(old[key], dict) and isinstance(new.get(key), dict):
                return (f"holds a run whose {key} {new[key]['path']!r} had other contents (sha256 "
                        f"{old[key]['sha256'][:12]}, now {new[key]['sha256'][:12]})")
            return f"holds a run with {key}={_shown(old[key])}, not {_shown(new.get(key))}"
    for label, files in new.get("method_files", {}).items():
        before = old.get("method_files", {}).get(label, {})
        for name, value in files.items():
            if name in before and not _same(before[name], value):
                return (f"holds a run whose {label} read {value['path']!r} ({name}) with other contents (sha256 "
                        f"{before[name]['sha256'][:12]}, now {value['sha256'][:12]})")
    return None


#: A run.json written before identities were recorded holds only its config; these keys of it were compared.
_LEGACY_KEYS = ("model", "seed", "chat", "haystack", "ppl_text", "dtype", "attn_implementation", "suite", "data_dir",
                "backend", "base_url", "api_model", "tokenizer", "ppl_chunk")


def _old_identity(meta: dict[str, Any], config: Any, identity: dict[str, Any]) -> tuple[dict, dict]:
    """(the directory's identity, the new eval's comparable to it): a legacy run.json compares its raw config
    (whose dtype was the resolved one)."""
    if "identity" in meta:
        return meta["identity"], identity
    old = {k: v for k, v in meta.get("config", {}).items() if k in _LEGACY_KEYS}
    return old, {**identity, **{k: getattr(config, k) for k in old if k != "dtype"}}


class RunLock:
    """An exclusive ``flock`` on ``RUN_DIR/eval.lock``, taken without waiting: a second eval fails at once."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip()
                os.close(fd)
                raise EvalError(
                    f"run directory {self.path.parent} is in use by another longkit eval"
                    f"{f' (pid {holder})' if holder else ''}; wait for it to finish, or choose another --out"
                ) from None
        # For the message of the eval that finds the directory locked.
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def check_out_dir(run_dir: Path) -> None:
    """``run_dir`` must be new, empty, or a run directory (holding run.json): never another directory's contents."""
    if run_dir.exists() and not run_dir.is_dir():
        raise EvalError(f"parameter 'run_dir' (--out): {run_dir} is a file, not a run directory")
    if run_dir.is_dir() and not (run_dir / RUN_FILE).is_file():
        others = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE)
        if others:
            raise EvalError(
                f"parameter 'run_dir' (--out): {run_dir} is an existing directory that is not a longkit run "
                f"(no {RUN_FILE}; holds {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}); choose a new "
                "or empty directory"
            )


@contextmanager
def open_run_dir(run_dir: Path, config: Any, identity: dict[str, Any]) -> Iterator[None]:
    """Check ``--out``, create it, hold its lock for the block, and refuse an identity that differs from the
    directory's (all but a resolved ``dtype: auto``, which :func:`record_invocation` checks once the model is
    loaded)."""
    check_out_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        check_identity(run_dir, config, identity, skip=("dtype",) if config.dtype == "auto" else ())
        yield
    finally:
        lock.release()


def check_identity(run_dir: Path, config: Any, identity: dict[str, Any], skip: tuple[str, ...] = ()) -> None:
    meta = load_run(run_dir)
    if not meta:
        return
    old, new = _old_identity(meta, config, identity)
    change = identity_change(old, new, skip)
    if change is not None:
        raise EvalError(
            f"run directory {run_dir} {change}: its records would be mixed with (or kept instead of) this eval's; "
            "choose another --out, or restore the setting"
        )


def _union(old: list[Any] | None, new: list[Any]) -> list[Any]:
    out = list(old or [])
    out += [x for x in new if x not in out]
    return out


#: What each invocation of ``longkit eval`` into the directory adds to run.json's ``invocations``.
INVOCATION_KEYS = ("started", "argv", "methods", "tasks", "lengths", "depths", "samples", "threshold", "versions",
                   "git_commit", "hardware")


def record_invocation(run_dir: Path, config: Any, meta: dict[str, Any], identity: dict[str, Any]) -> None:
    """Check the identity again with the resolved dtype, then write run.json: a new run's ``meta``, or the existing
    run grown by this invocation (the union of methods, tasks, lengths and depths; the largest sample count; the
    new method combinations' files). The first invocation's fields stay; every invocation is kept, in order, in
    ``invocations``."""
    identity = {**identity, "dtype": meta["config"]["dtype"]}
    check_identity(run_dir, config, identity)
    invocation = {k: meta.get(k) for k in INVOCATION_KEYS}
    old = load_run(run_dir)
    if not old:
        write_run(run_dir, {**meta, "identity": identity, "invocations": [invocation]})
        return
    grown = dict(old)
    for key in ("methods", "tasks", "depths"):
        grown[key] = _union(old.get(key), meta[key])
    grown["lengths"] = sorted(set(old.get("lengths") or []) | set(meta["lengths"]))
    grown["samples"] = max(int(old.get("samples") or 0), int(meta["samples"]))
    before = old.get("identity")
    if before is None:
        grown["identity"] = identity
    else:
        grown["identity"] = {**before, "method_files": {**identity["method_files"], **before.get("method_files", {})}}
    history = old.get("invocations") or [{k: old.get(k) for k in INVOCATION_KEYS}]
    grown["invocations"] = [*history, invocation]
    write_run(run_dir, grown)
