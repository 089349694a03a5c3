"""What ``edgespec bench`` compares: edgespec's (backend, draft) pairs and peer engines.

Every configuration runs in a worker subprocess of its own (``worker.py`` + one
``peer_<adapter>.py``), so each has its own peak RSS and KV cache, and a peer whose
dependencies conflict with edgespec's runs under its own virtualenv's Python. The
virtualenvs are made once by ``make peers`` under :data:`PEERS_DIR`; a peer that is not
installed is skipped with a note, never an error.

Labels are ``<engine>:<variant>``; every engine's plain decoding is ``<engine>:plain``, the
reference its speculative variants must reproduce token for token.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from edgespec.errors import UserError

PEERS_DIR = Path(os.environ.get("EDGESPEC_PEERS_DIR",
                                Path.home() / ".cache" / "edgespec" / "peers"))
PLAIN = "plain"


@dataclass(frozen=True)
class Config:
    """One benchmark configuration: which worker adapter runs it, how, and on what."""

    label: str
    adapter: str
    options: dict = field(hash=False)
    python: Path
    model_format: str = "gguf"  # a key of edgespec.peers.exports.EXPORTERS, or gguf
    same_engine: bool = False  # llama.cpp on the baseline's own GGUF

    @property
    def engine(self) -> str:
        return self.label.split(":")[0]

    @property
    def plain(self) -> str:
        return plain_of(self.label)


def plain_of(label: str) -> str:
    """The label of plain decoding on the engine of configuration ``label`` (with its KV
    precision: a fixed one changes the numerics; a budget does not)."""
    engine, _, variant = label.partition(":")
    kv = re.search(r"\+kv-[^@+]+", variant)
    return f"{engine}:{PLAIN}{kv.group(0) if kv else ''}"


@dataclass(frozen=True)
class Peer:
    """A peer engine: its adapter, where it is installed and its benchmarked variants."""

    adapter: str
    module: str  # what its worker imports: the installation check
    venv: str | None  # None: edgespec's own environment
    model_format: str
    variants: dict[str, dict]
    run_options: tuple[str, ...] = ()  # run-wide options (e.g. ctx) the adapter takes


# Variant settings follow each library's own guidance: llama-cpp-python's docs advise
# num_pred_tokens=2 on CPU; OpenVINO GenAI's prompt-lookup sample uses 5 tokens, 3-grams;
# onnxruntime-genai's default draft length is 4.
PEERS: dict[str, Peer] = {
    "llama-cpp-python": Peer("llamacpp", "llama_cpp", None, "gguf",
                             {PLAIN: {}, "lookup": {"num_pred_tokens": 2, "max_ngram_size": 2}},
                             run_options=("ctx",)),
    "openvino-genai": Peer("openvino", "openvino_genai", "openvino", "openvino",
                           {PLAIN: {}, "lookup": {"num_assistant_tokens": 5, "max_ngram_size": 3}}),
    "ort-genai": Peer("ortgenai", "onnxruntime_genai", "ortgenai", "ortgenai",
                      {PLAIN: {}, "lookup": {"ngram_size": 3, "max_draft_tokens": 4}}),
}
# the peer that defines "llama.cpp plain decoding", the denominator of the goal figure
RATIO_REFERENCE = f"llama-cpp-python:{PLAIN}"


def venv_python(venv: str) -> Path:
    return PEERS_DIR / f"{venv}-venv" / "bin" / "python"


def edgespec_config(backend: str, draft: str, *, ctx: int, tree_size: int | None,
                    saved_profile: bool = True, memory_budget: str | None = None,
                    min_ctx: int = 512, kv_type: str | None = None,
                    draft_model: Path | None = None) -> Config:
    """edgespec with ``draft`` ("none" = plain decoding) on ``backend``, in this Python;
    ``saved_profile=False`` (variant ``<draft>+probe``) ignores the device's saved profile;
    ``memory_budget`` (variant ``<draft>@<budget>``) plans for it, holding ``min_ctx``;
    ``kv_type`` (variant ``<draft>+kv-<type>``) fixes the KV cache's precision;
    ``draft_model`` (variant ``<draft>+dm-<file stem>``) loads that draft model beside."""
    variant = PLAIN if draft == "none" else draft + ("" if saved_profile else "+probe")
    if draft_model is not None:
        variant += f"+dm-{draft_model.stem}"
    if kv_type is not None:
        variant += f"+kv-{kv_type}"
    if memory_budget is not None:
        variant += f"@{memory_budget}"
    return Config(f"edgespec-{backend}:{variant}", "edgespec",
                  {"backend": backend, "draft": draft, "ctx": ctx, "tree_size": tree_size,
                   "saved_profile": saved_profile, "memory_budget": memory_budget,
                   "min_ctx": min_ctx, "kv_type": kv_type,
                   "draft_model": None if draft_model is None else str(draft_model)},
                  Path(sys.executable), EDGESPEC_FORMATS.get(backend, "gguf"),
                  same_engine=backend == "llamacpp")


# what edgespec's own non-GGUF backends load: the GGUF exported by `edgespec export`
EDGESPEC_FORMATS = {"onnx": "edgespec-onnx", "openvino": "edgespec-openvino"}


def select_peers(spec: str) -> list[tuple[str, str]]:
    """``all``, ``none`` or a comma list of ``engine`` / ``engine:variant`` → (engine, variant)."""
    if spec.strip() in ("", "none"):
        return []
    names = list(PEERS) if spec.strip() == "all" else [s.strip() for s in spec.split(",")]
    chosen = []
    for name in names:
        engine, _, variant = name.partition(":")
        if engine not in PEERS or (variant and variant not in PEERS[engine].variants):
            known = ", ".join(f"{e}[:{'|'.join(p.variants)}]" for e, p in PEERS.items())
            raise UserError(f"unknown peer {name!r}; choose all, none or from: {known}")
        chosen += [(engine, v) for v in ([variant] if variant else PEERS[engine].variants)]
    return list(dict.fromkeys(chosen))


def peer_config(engine: str, variant: str, run: dict) -> Config:
    """The configuration of one peer variant; ``run`` holds run-wide options such as ctx."""
    peer = PEERS[engine]
    options = {**{k: run[k] for k in peer.run_options}, **peer.variants[variant]}
    python = Path(sys.executable) if peer.venv is None else venv_python(peer.venv)
    return Config(f"{engine}:{variant}", peer.adapter, options, python, peer.model_format,
                  same_engine=peer.model_format == "gguf")


def missing(engine: str) -> str | None:
    """Why ``engine`` cannot run here, or None if it is installed."""
    peer = PEERS[engine]
    if peer.venv is None:
        found = importlib.util.find_spec(peer.module) is not None
    else:
        found = venv_python(peer.venv).exists()
    return None if found else f"{engine} is not installed (run `make peers`)"


__all__ = ["PEERS", "PEERS_DIR", "PLAIN", "RATIO_REFERENCE", "Config", "Peer", "edgespec_config",
           "missing", "peer_config", "plain_of", "select_peers", "venv_python"]
