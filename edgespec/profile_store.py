"""Saved device profiles: one JSON file per device + model + backend + build.

A profile measured once (``edgespec profile``) lets every later load skip the start-up
probe, which costs a second and, on a busy machine, measures the other process instead of
the device. A file is written whole or not at all (a temporary renamed into place); one
that does not parse, or records another schema, is ignored with a one-line warning and
measured again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from edgespec.device import DeviceFacts
from edgespec.profiler import BackendProfile
from runtimes.base import write_json
from runtimes.formats import MANIFEST

SCHEMA = 1


def profile_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgespec" / "profiles"


def model_key(path: Path) -> str:
    """A model's identity without reading all of it: its name, size and first 4 MiB (a
    GGUF's header and first tensors); an export directory by its files and manifest."""
    digest = hashlib.sha256(path.name.encode())
    if path.is_dir():
        for f in sorted(path.iterdir()):
            digest.update(f"{f.name}:{f.stat().st_size}".encode())
        manifest = path / MANIFEST
        if manifest.is_file():
            digest.update(manifest.read_bytes())
    else:
        digest.update(str(path.stat().st_size).encode())
        with path.open("rb") as f:
            digest.update(f.read(4 * 2**20))
    return digest.hexdigest()[:16]


def profile_path(device_key: str, model: Path, backend: str, build: str) -> Path:
    key = hashlib.sha256("\n".join([device_key, model_key(model), backend, build]).encode())
    return profile_dir() / f"{backend}-{key.hexdigest()[:20]}.json"


def save(device: DeviceFacts, model: Path, profiles: list[BackendProfile]) -> Path:
    """Write one backend's profiles (one per thread count) atomically; returns the file."""
    first = profiles[0]
    path = profile_path(device.key(), model, first.backend, first.build)
    record = {"schema": SCHEMA, "device": device.as_dict(), "model": str(model),
              "backend": first.backend, "build": first.build,
              "profiles": [p.as_dict() for p in profiles]}
    write_json(path, record, indent=1)
    return path


def load(device_key: str, model: Path, backend: str, build: str,
         threads: int | None) -> BackendProfile | None:
    """The saved profile for this device, model, backend, build and thread count, if any."""
    path = profile_path(device_key, model, backend, build)
    try:
        record = json.loads(path.read_text())
        if record.get("schema") != SCHEMA:
            raise ValueError(f"schema {record.get('schema')!r}, not {SCHEMA}")
        profiles = [BackendProfile.from_dict(p) for p in record["profiles"]]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        logging.getLogger("edgespec").warning(
            "edgespec: ignoring the unreadable device profile %s (%s); run `edgespec profile` "
            "to measure it again", path, e)
        return None
    return next((p for p in profiles if p.threads == threads), None)
