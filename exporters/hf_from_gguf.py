"""Make a Hugging Face model folder from a GGUF file: ``hf_from_gguf.py MODEL.gguf OUT_DIR``.

Peers' own exporters (optimum-intel, onnxruntime-genai's model builder) start from such a
folder. transformers dequantizes the GGUF to float32 and converts its tokenizer; the model
it returns is flagged as GGUF-quantized and refuses ``save_pretrained``, so its weights are
moved into a plain model built from the same config. Runs in a peer virtualenv with
transformers >= 5.24 (5.5, which optimum-intel pins, writes a broken byte-level tokenizer).
"""

from __future__ import annotations

import sys
from pathlib import Path


def convert(gguf: Path, out: Path) -> None:
    # imported here: this script runs in a peer's venv, never inside the edgespec runtime
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where = {"pretrained_model_name_or_path": gguf.parent, "gguf_file": gguf.name}
    loaded = AutoModelForCausalLM.from_pretrained(**where)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(**where))
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(**where).save_pretrained(out)


if __name__ == "__main__":
    convert(Path(sys.argv[1]), Path(sys.argv[2]))
