"""GGUF fuzzing: structure-aware mutations of real files, the validator in-process, and the
files it accepts loaded by llama.cpp in a worker process that may crash or hang.

A crash or a hang of the worker is a *finding* (the file is kept), never a dead test run:
the worker is restarted and the campaign goes on. ``python -m tests.gguf_fuzz -n 10000``
(``make fuzz``) prints how many cases ran and what they found; tests/test_fuzz_gguf.py
runs a bounded number under hypothesis.
"""

from __future__ import annotations

import argparse
import os
import random
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import gguf

from edgespec.errors import UserError
from runtimes.ggufinfo import check_gguf

WORKER = Path(__file__).with_name("gguf_native_worker.py")
SPECIAL = (0, 1, 2, 0xFF, 2**15, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63,
           2**64 - 1)
WIDTH = {"uint8": 1, "int8": 1, "uint16": 2, "int16": 2, "uint32": 4, "int32": 4, "float32": 4,
         "uint64": 8, "int64": 8, "float64": 8, "bool": 1}


class Choose(Protocol):
    """Where a mutation's choices come from: hypothesis, or a seeded random.Random."""

    def pick(self, options: list): ...
    def integer(self, lo: int, hi: int) -> int: ...


class RandomChoose:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def pick(self, options: list):
        return self.rng.choice(options)

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)


@dataclass
class Layout:
    """Where a GGUF file keeps its lengths, types and section boundaries."""

    data: bytes
    lengths: list[tuple[int, int]] = field(default_factory=list)  # (offset, width)
    scalars: list[tuple[int, int]] = field(default_factory=list)  # KV values: (offset, width)
    kv_types: list[int] = field(default_factory=list)
    tensor_types: list[int] = field(default_factory=list)
    tensor_offsets: list[int] = field(default_factory=list)
    records: list[tuple[int, int]] = field(default_factory=list)  # each KV's byte span
    boundaries: list[int] = field(default_factory=list)
    header_end: int = 0  # where the tensor descriptions end
    data_start: int = 0
    alignment: int = 32
    kv_count_at: int = 16

    @classmethod
    def of(cls, path: Path, *, size: int | None = None) -> Layout:
        """The layout of ``path``; ``size`` keeps only the first bytes (a large model's header,
        extended again with zeros when a mutant is written)."""
        reader = gguf.GGUFReader(path)
        with path.open("rb") as f:
            layout = cls(f.read(size) if size else f.read())
        for name, fld in reader.fields.items():
            spans = _spans(fld)
            if name.startswith("GGUF."):
                if name != "GGUF.version":
                    layout.lengths.append(spans[0])
                continue
            layout.records.append((fld.offset, spans[-1][0] + spans[-1][1]))
            layout.lengths.append(spans[0])
            layout.kv_types.append(spans[2][0])
            if fld.types[0] == gguf.GGUFValueType.STRING:
                layout.lengths.append(spans[3])
            elif fld.types[0] == gguf.GGUFValueType.ARRAY:
                layout.lengths.append(spans[4])
                layout.lengths += spans[5::2][:64] if fld.types[-1] == gguf.GGUFValueType.STRING \
                    else []
            else:
                layout.scalars.append(spans[3])
        for t in reader.tensors:
            spans = _spans(t.field)
            layout.lengths += [spans[0], spans[2], *spans[3:-2]]  # name length, n_dims, dims
            layout.tensor_types.append(spans[-2][0])
            layout.tensor_offsets.append(spans[-1][0])
            layout.boundaries += [t.data_offset, t.data_offset + t.n_bytes]
        layout.header_end = max(o + w for o, w in _spans(reader.tensors[-1].field)[-1:])
        layout.data_start, layout.alignment = reader.data_offset, reader.alignment
        layout.boundaries += [4, 8, 16, 24, layout.header_end, layout.data_start,
                              *(s for s, _ in layout.records), *(e for _, e in layout.records)]
        return layout


def _spans(fld: gguf.ReaderField) -> list[tuple[int, int]]:
    """(offset, width) of each part of a field, the dims of a tensor as one part each."""
    spans, at = [], fld.offset
    for part in fld.parts:
        width = WIDTH[part.dtype.name]
        if part.dtype.name == "uint8":  # a string's bytes: one span
            spans.append((at, len(part)))
        else:
            spans += [(at + i * width, width) for i in range(len(part))]
        at += len(part) * width
    return spans


def _put(data: bytearray, offset: int, width: int, value: int) -> None:
    data[offset:offset + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")


def mutate(layout: Layout, choose: Choose) -> tuple[bytes, str]:
    """One mutant of ``layout.data`` and what was done to it."""
    data = bytearray(layout.data)
    kind = choose.pick(["flip", "length", "truncate", "duplicate", "kv_type", "scalar",
                        "tensor_type", "tensor_offset"])
    if kind == "flip":
        at = choose.integer(0, layout.header_end - 1)
        data[at] ^= choose.integer(1, 255)
        return bytes(data), f"flip byte {at}"
    if kind == "truncate":
        at = max(0, min(len(data), choose.pick(layout.boundaries) + choose.integer(-1, 1)))
        return bytes(data[:at]), f"truncate at {at}"
    if kind == "duplicate":
        start, end = choose.pick(layout.records)
        head = data[:start] + data[start:end] + data[start:layout.header_end]
        _put(head, layout.kv_count_at, 8, int.from_bytes(data[16:24], "little") + 1)
        padding = -len(head) % layout.alignment
        return bytes(head + bytes(padding) + data[layout.data_start:]), f"duplicate KV at {start}"
    spots = {"length": layout.lengths, "scalar": layout.scalars,
             "kv_type": [(o, 4) for o in layout.kv_types],
             "tensor_type": [(o, 4) for o in layout.tensor_types],
             "tensor_offset": [(o, 8) for o in layout.tensor_offsets]}[kind]
    offset, width = choose.pick(spots)
    old = int.from_bytes(data[offset:offset + width], "little")
    value = choose.pick([*SPECIAL, old + 1, old - 1, old * 2, len(data), choose.integer(0, 64)])
    _put(data, offset, width, value)
    return bytes(data), f"{kind} at {offset}: {old} -> {value % 2 ** (8 * width)}"


class NativeWorker:
    """llama.cpp in a child process: loads a file, tokenizes, decodes; restarted on death."""

    def __init__(self, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                         text=True, bufsize=1)
        return self.proc

    def run(self, path: Path) -> str:
        """"ok", "error" (llama.cpp refused it cleanly), "crash: ..." or "hang"."""
        proc = self._start()
        proc.stdin.write(f"{path}\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], self.timeout)
        if not ready:
            self.close()
            return "hang"
        line = proc.stdout.readline().strip()
        if line in ("ok", "error"):
            return line
        code = proc.wait()
        self.proc = None
        return f"crash: exit {code}"

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@dataclass
class Campaign:
    """Counts of what the mutants did; findings are kept under ``findings``."""

    findings: Path
    counts: Counter = field(default_factory=Counter)
    found: list[str] = field(default_factory=list)

    def case(self, layout: Layout, full_size: int, choose: Choose, worker: NativeWorker,
             scratch: Path) -> str:
        data, what = mutate(layout, choose)
        sparse = full_size - len(layout.data) if len(data) >= len(layout.data) else 0
        return self.judge(data, what, worker, scratch, sparse=sparse)

    def judge(self, data: bytes, what: str, worker: NativeWorker, scratch: Path, *,
              sparse: int = 0) -> str:
        """``data`` (then ``sparse`` zero bytes: a large model's weights) through the
        validator, and through llama.cpp if the validator accepts it."""
        self.counts["cases"] += 1
        path = scratch / "case.gguf"
        with path.open("wb") as f:
            f.write(data)
            if sparse > 0:
                f.truncate(len(data) + sparse)
        try:
            check_gguf(path, path.read_bytes() if path.stat().st_size < 2**26 else _mapped(path))
        except UserError as e:
            if "\n" not in str(e):
                self.counts["refused"] += 1
                return "refused"
            return self._found(path, f"validator: a message of several lines ({what})")
        except Exception as e:  # noqa: BLE001 - anything else the validator raises is a bug
            return self._found(path, f"validator: {type(e).__name__}: {e} ({what})")
        self.counts["accepted"] += 1
        verdict = worker.run(path)
        self.counts[verdict.split(":")[0]] += 1
        if verdict.startswith(("crash", "hang")):
            return self._found(path, f"{verdict} ({what})")
        return verdict

    def report(self, seconds: float) -> int:
        """Print the counts and findings; the exit status: 1 if anything was found."""
        print(f"{self.counts['cases']} cases in {seconds:.0f} s: "
              + ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()) if k != "cases"),
              flush=True)
        for line in self.found:
            print("finding:", line, flush=True)
        return 1 if self.found else 0

    def _found(self, path: Path, what: str) -> str:
        """Keep the file that did it under ``findings``."""
        self.counts["findings"] += 1
        kept = self.findings / f"finding-{self.counts['cases']}.gguf"
        self.findings.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, kept)
        self.found.append(f"{what} -> {kept}")
        return what


def _mapped(path: Path):
    import mmap

    with path.open("rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def bases(scratch: Path) -> list[tuple[Layout, int]]:
    """A 17-token Llama written here, and the packaged SmolLM2's header (real metadata:
    49k tokens, merges, a chat template) with its weights as a sparse hole."""
    from edgespec.models import default_model_path
    from tests.test_sampling import write_small_vocab_llama

    small = write_small_vocab_llama(scratch / "small.gguf")
    smol = default_model_path()
    layout = Layout.of(smol)
    header = Layout.of(smol, size=layout.data_start)
    header.boundaries = [b for b in layout.boundaries if b <= layout.data_start]
    return [(Layout.of(small), small.stat().st_size), (header, smol.stat().st_size)]


def campaign_arguments(doc: str, seed: int) -> argparse.Namespace:
    """A fuzzing command's options: cases to run, the seed, where findings are kept."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("-n", "--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=seed)
    parser.add_argument("--findings", type=Path, default=Path("fuzz-findings"))
    return parser.parse_args()


def main() -> None:
    args = campaign_arguments(__doc__, seed=0)
    choose, worker = RandomChoose(args.seed), NativeWorker()
    campaign = Campaign(args.findings)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        targets = bases(scratch)
        for i in range(args.cases):
            layout, size = targets[0] if i % 4 else targets[1]  # the 49k-token header is slower
            campaign.case(layout, size, choose, worker, scratch)
    worker.close()
    sys.exit(campaign.report(time.perf_counter() - start))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
