"""The model each peer loads, made from the benchmarked GGUF by the peer's own tools, once.

Peers run the same model as edgespec, exported the way their users export it: a Hugging
Face folder is made from the GGUF (``exporters/hf_from_gguf.py``, in the ort-genai
virtualenv, whose transformers converts the GGUF tokenizer correctly), then
``optimum-cli export openvino`` (int8 weights) for OpenVINO GenAI and onnxruntime-genai's
model builder (int4 weights) for ort-genai. Results are cached under
``PEERS_DIR/models/<gguf stem>-<size>/``; a folder only counts once its export finished
(``.done``), so an interrupted export is redone.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import exporters
from edgespec.errors import UserError
from edgespec.peers import PEERS_DIR, venv_python
from runtimes.formats import FORMATS, MANIFEST, manifest_version

# an exporter (it imports transformers), run as a script under the ort-genai venv's Python
HF_SCRIPT = Path(exporters.__file__).with_name("hf_from_gguf.py")


class ExportError(UserError):
    """A peer's exporter failed; the peer is skipped and its log kept."""


def model_for(model_format: str, gguf: Path) -> Path:
    """The file or folder a peer loads for ``gguf``, exporting it first if needed."""
    if model_format == "gguf":
        return gguf
    folder = PEERS_DIR / "models" / f"{gguf.stem}-{gguf.stat().st_size}"
    return EXPORTERS[model_format](gguf, folder)


def _cached(out: Path, make: Callable[[Path], list[str]]) -> Path:
    """``out`` if a finished export is there; else run the command ``make(tmp)`` builds."""
    if (out / ".done").exists():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    command = make(tmp)
    log = out.with_name(out.name + ".log")
    if not Path(command[0]).exists():
        raise ExportError(f"cannot export {out.name}: {command[0]} is missing (run `make peers`)")
    with log.open("w") as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              cwd=tmp, check=False)
    if done.returncode != 0:
        last = log.read_text(errors="replace").strip().splitlines()[-1:]
        raise ExportError(f"exporting {out.name} failed ({' '.join(last)}); see {log}")
    shutil.rmtree(tmp / "cache_dir", ignore_errors=True)  # the model builder's scratch files
    (tmp / ".done").touch()
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _hf(gguf: Path, folder: Path) -> Path:
    return _cached(folder / "hf", lambda out: [
        str(venv_python("ortgenai")), str(HF_SCRIPT), str(gguf), str(out)])


def _openvino(gguf: Path, folder: Path) -> Path:
    hf = _hf(gguf, folder)
    return _cached(folder / "openvino-int8", lambda out: [
        str(venv_python("openvino").with_name("optimum-cli")), "export", "openvino", "-m", str(hf),
        "--task", "text-generation-with-past", "--weight-format", "int8", str(out)])


def _ortgenai(gguf: Path, folder: Path) -> Path:
    hf = _hf(gguf, folder)
    return _cached(folder / "ortgenai-int4", lambda out: [
        str(venv_python("ortgenai")), "-m", "onnxruntime_genai.models.builder", "-i", str(hf),
        "-o", str(out), "-p", "int4", "-e", "cpu"])


def _edgespec(to: str, quant: str) -> Callable[[Path, Path], Path]:
    """edgespec's own exporter, in this process (it is atomic: a finished export exists);
    an export an older edgespec made in an older format is made again."""
    def export(gguf: Path, folder: Path) -> Path:
        from exporters import export_model

        out = folder / f"edgespec-{to}-{quant}"
        if _manifest_version(out / MANIFEST) != FORMATS[to].version:
            export_model(gguf, out, to=to, quant=quant, force=True)
        return out
    return export


def _manifest_version(manifest: Path) -> int | None:
    """The format version an edgespec export's manifest gives (None: no readable export)."""
    try:
        return manifest_version(json.loads(manifest.read_text()))
    except (OSError, ValueError):
        return None


EXPORTERS: dict[str, Callable[[Path, Path], Path]] = {
    "openvino": _openvino, "ortgenai": _ortgenai,
    "edgespec-onnx": _edgespec("onnx", "int4"), "edgespec-openvino": _edgespec("openvino", "int8"),
}

# how each export's weights are stored, for the report
PRECISION = {"gguf": "the GGUF as is", "openvino": "int8 (optimum-cli --weight-format int8)",
             "ortgenai": "int4 (model builder -p int4)",
             "edgespec-onnx": "int4 (edgespec export --to onnx --quant int4)",
             "edgespec-openvino": "int8 (edgespec export --to openvino --quant int8)"}
