"""The prompt library: a folder of named prompts.

    ROOT/NAME/prompt.safetensors   key "prompt_embeddings": float32 [P, H], contiguous
    ROOT/NAME/prompt.json          task, backbone, family, hidden_size, length, head, metrics,
                                   config, provenance, version, created
    ROOT/NAME/*.safetensors        optional extras: head.safetensors (linear head),
                                   composer.safetensors (attention composer), backbone.safetensors (joint delta), lora.safetensors (joint + LoRA)

ROOT is ``--library DIR``, else $PROMPT_COMPOSER_LIBRARY, else $XDG_DATA_HOME/prompt-composer/library
(~/.local/share/prompt-composer/library). An entry is written into a temporary folder beside it and
renamed into place under a lock, so readers never see half an entry and two writers never mix files.
No pickle anywhere: tensors are safetensors, the rest is JSON.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from composer import __version__
from composer.atomic import swap_dir
from composer.errors import LibraryError
from composer.names import check_name

log = logging.getLogger(__name__)

PROMPT_FILE = "prompt.safetensors"
META_FILE = "prompt.json"
PROMPT_KEY = "prompt_embeddings"
KNOWN_KEYS = {"name", "task", "backbone", "family", "hidden_size", "length", "head", "metrics", "config",
              "provenance", "version", "created", "extras", "kind", "prefix_shape", "prefix_heads", "position", "lora"}


def default_root() -> Path:
    env = os.environ.get("PROMPT_COMPOSER_LIBRARY")
    if env:
        return Path(env).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "prompt-composer" / "library"



@dataclass
class Entry:
    name: str
    prompt: torch.Tensor  # [P, H] float32
    meta: dict
    path: Path
    extras: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def extra(self, stem: str) -> dict[str, torch.Tensor] | None:
        if stem not in self.extras:
            f = self.path / f"{stem}.safetensors"
            if not f.exists():
                return None
            self.extras[stem] = _read_tensors(f, self.name)
        return self.extras[stem]


def _read_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LibraryError(f"prompt '{name}': {path.name} is truncated or corrupted ({str(e).splitlines()[0]}); "
                           f"retrain it or remove it with `prompt-composer library rm {name}`") from None


class Library:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root else default_root()

    def __repr__(self) -> str:
        return f"Library({str(self.root)!r})"

    # -- reading ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and (p / META_FILE).exists())

    def broken(self) -> list[str]:
        """Entry folders without a prompt.json (a copy cut short, a hand-made folder): listed as broken,
        removable with ``remove``; ``names`` leaves them out, so nothing else tries to read them."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
                      and not (p / META_FILE).exists())

    def exists(self, name: str) -> bool:
        return (self.root / check_name(name) / META_FILE).exists()

    def content_sha(self, name: str) -> str:
        """A short hash of the entry's tensors (not its metadata): equal exactly when the saved prompt is."""
        h = hashlib.sha256()
        for f in sorted(self._dir(name).glob("*.safetensors")):
            h.update(f.read_bytes())
        return h.hexdigest()[:16]

    def _dir(self, name: str) -> Path:
        d = self.root / check_name(name)
        if not (d / META_FILE).exists():
            if d.is_dir():
                raise LibraryError(f"prompt '{name}' is broken: {d} has no {META_FILE}; remove it with "
                                   f"`prompt-composer library rm {name}`")
            known = self.names()
            hint = f" (it has: {', '.join(known[:10])}{'...' if len(known) > 10 else ''})" if known else " (it is empty)"
            raise LibraryError(f"no prompt '{name}' in the library at {self.root}{hint}")
        return d

    def meta(self, name: str) -> dict:
        d = self._dir(name)
        try:
            meta = json.loads((d / META_FILE).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LibraryError(f"prompt '{name}': {META_FILE} is not valid JSON ({e})") from None
        if not isinstance(meta, dict):
            raise LibraryError(f"prompt '{name}': {META_FILE} must hold a JSON object")
        extra = sorted(set(meta) - KNOWN_KEYS)
        if extra:
            log.warning("prompt '%s' has keys this version (%s) does not know: %s (written by version %s); ignoring them",
                        name, __version__, ", ".join(extra), meta.get("version", "?"))
        return meta

    def load(self, name: str) -> Entry:
        d = self._dir(name)
        meta = self.meta(name)
        tensors = _read_tensors(d / PROMPT_FILE, name)
        if PROMPT_KEY not in tensors:
            raise LibraryError(f"prompt '{name}': {PROMPT_FILE} has no '{PROMPT_KEY}' tensor (keys: {sorted(tensors)})")
        prompt = tensors[PROMPT_KEY]
        if meta.get("kind", "prompt") == "prefix":
            if prompt.dim() != 4 or list(prompt.shape) != list(meta.get("prefix_shape") or prompt.shape):
                raise LibraryError(f"prompt '{name}': a prefix must be an [L, 2, P, D] tensor of shape "
                                   f"{meta.get('prefix_shape')} (prompt.json), got {tuple(prompt.shape)}")
            return Entry(name=name, prompt=prompt.float(), meta=meta, path=d)
        if prompt.dim() != 2:
            raise LibraryError(f"prompt '{name}': expected a [P, H] tensor, got shape {tuple(prompt.shape)}")
        want = (meta.get("length"), meta.get("hidden_size"))
        if None not in want and tuple(prompt.shape) != want:
            raise LibraryError(f"prompt '{name}': tensor shape {tuple(prompt.shape)} does not match "
                               f"prompt.json (length {want[0]}, hidden_size {want[1]})")
        return Entry(name=name, prompt=prompt.float(), meta=meta, path=d)

    # -- writing ------------------------------------------------------------------------------
    def check_writable(self) -> None:
        """Fail now, in one line, where an entry could not be written later (before a run trains for hours):
        the root, or the nearest folder above it that exists, must be a folder this process may write."""
        p = self.root
        while not p.exists() and p.parent != p:
            p = p.parent
        if not p.is_dir():
            raise LibraryError(f"the library at {self.root} cannot be made: {p} is a file; give another "
                               "--library (or PROMPT_COMPOSER_LIBRARY)")
        if not os.access(p, os.W_OK | os.X_OK):
            raise LibraryError(f"the library at {self.root} is not writable ({p} is read-only to this user); "
                               "give another --library (or PROMPT_COMPOSER_LIBRARY) or fix its permissions")

    @contextlib.contextmanager
    def _lock(self):
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def save(self, name: str, prompt: torch.Tensor, meta: dict,
             extras: dict[str, dict[str, torch.Tensor]] | None = None, overwrite: bool = True) -> Path:
        """Write NAME atomically. ``extras`` maps a file stem to tensors (e.g. {"head": {...}}).

        ``prompt`` is a [P, H] prompt, or with ``meta["kind"] == "prefix"`` an [L, 2, P, D] prefix (then
        ``meta["hidden_size"]`` names the backbone's H, which a prefix's shape does not say)."""
        check_name(name)
        meta = dict(meta)
        prefix = meta.get("kind", "prompt") == "prefix"
        if prefix and (prompt.dim() != 4 or prompt.shape[1] != 2 or "hidden_size" not in meta):
            raise LibraryError(f"prompt '{name}': a prefix is an [L, 2, P, D] tensor with the backbone's "
                               f"hidden_size in its meta, got shape {tuple(prompt.shape)}")
        if not prefix and prompt.dim() != 2:
            raise LibraryError(f"prompt '{name}': expected a [P, H] tensor, got shape {tuple(prompt.shape)}")
        prompt = prompt.detach().to("cpu", torch.float32).contiguous()
        if prefix:
            meta.update(length=prompt.shape[2], prefix_shape=list(prompt.shape))
        else:
            meta.update(kind="prompt", length=prompt.shape[0], hidden_size=prompt.shape[1])
        meta.update(name=name, version=__version__,
                    created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        meta["extras"] = sorted(extras or {})
        self.check_writable()
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            save_file({PROMPT_KEY: prompt}, str(tmp / PROMPT_FILE))
            for stem, tensors in (extras or {}).items():
                save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                          str(tmp / f"{stem}.safetensors"))
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            final = self.root / name
            with self._lock():
                if final.exists() and not overwrite:
                    raise LibraryError(f"prompt '{name}' already exists in {self.root}; pick another name")
                swap_dir(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return final

    def remove(self, name: str) -> None:
        d = self.root / check_name(name)
        if not d.is_dir() or d.is_symlink():  # a broken entry (no prompt.json) is removed like a whole one
            self._dir(name)  # the usual "no prompt ..." error
            raise LibraryError(f"'{name}' in the library at {self.root} is not an entry folder; remove it by hand")
        self.check_writable()
        with self._lock():
            trash = self.root / f".{name}.{uuid.uuid4().hex[:8]}.old"
            os.rename(d, trash)
        shutil.rmtree(trash, ignore_errors=True)


def prompt_position(meta: dict) -> str:
    """Where an entry's input-level prompt sits on a BERT-style encoder (entries older than the option: after
    [CLS], where every prompt went then)."""
    return meta.get("position") or "after-cls"


def check_compatible(meta: dict, name: str, backbone_name: str, family: str, hidden_size: int) -> None:
    """A prompt must match the backbone it is loaded into; the error names both sides."""
    if meta.get("hidden_size") != hidden_size:
        raise LibraryError(f"prompt '{name}' has hidden size {meta.get('hidden_size')} (backbone "
                           f"'{meta.get('backbone')}') but backbone '{backbone_name}' has hidden size {hidden_size}")
    if meta.get("family") and meta["family"] != family:
        raise LibraryError(f"prompt '{name}' was trained on a {meta['family']} ('{meta.get('backbone')}') "
                           f"but backbone '{backbone_name}' is a {family}")
