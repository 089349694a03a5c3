"""The export formats the exporters write and the slot backends read, in one place.

Both sides need the same names, versions and graph inputs; they live on the runtime side so
that dependencies point one way: ``exporters/`` imports this, ``runtimes/`` never imports
``exporters/``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "edgespec.json"  # every export's sidecar: format, version, KV shape, tokens


@dataclass(frozen=True)
class ExportFormat:
    """One kind of export: what its manifest says and what its graphs take."""

    name: str  # the manifest's "format"
    version: int  # exports of an older version are refused
    model_file: str
    export_hint: str  # the command that makes one
    required_inputs: tuple[str, ...]  # what the runtime feeds: a graph lacking one is foreign


ONNX = ExportFormat("edgespec-onnx-decoder", 1, "model.onnx",
                    "edgespec export MODEL --to onnx -o OUT",
                    ("input_ids", "position_ids", "attn_mask", "logits_rows"))

# OpenVINO versions: 2 appends zero K/V rows up to the mask's width (older graphs need
# padding rows); 3 writes RoPE in the form the CPU plugin fuses (2 ran ~8% slower); 4 puts
# attention in the MHA pattern, queries scaled instead of keys (3: ~8% slower); 5 binds K/V
# windows across calls with a kv_slots scatter, one new_kv output, group-major query heads
# (4: ~7% slower plain decoding); 6 makes K/V head-major, the whole cache bound once and
# sliced in the graph (5: ~11% slower on the dev prompts, 25% at 600 cached tokens)
OPENVINO = ExportFormat("edgespec-openvino-decoder", 6, "openvino_model.xml",
                        "edgespec export MODEL --to openvino -o OUT",
                        ("input_ids", "position_ids", "attn_mask", "logits_rows", "kv_slots"))


# the export formats by what makes and runs them: `--to onnx` / `--backend onnx`, …
FORMATS = {"onnx": ONNX, "openvino": OPENVINO}

Exporter = Callable[[Path, Path], Path]
"""``exporter(src, out_dir)``: an export of ``src`` in ``out_dir``. The loader hands one
to a slot backend given a model that is not an export, since runtimes never import
exporters."""


def manifest_version(meta: dict) -> int:
    """The format version a manifest records (exports made before versioning are 1)."""
    return int(meta.get("version", 1))
