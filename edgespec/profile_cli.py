"""``edgespec profile``: what this device is and what verifying costs on it, saved.

Each installed backend is loaded at each thread count, measured (:func:`profiler.measure`)
and saved (:mod:`profile_store`), so every later load on this device reads its curve
instead of probing. The JSON document printed by ``--json`` is the profile schema later
fields (memory overheads, RPC latency) are added to.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from rich.console import Console
from rich.table import Table

import runtimes
from edgespec import profile_store
from edgespec.device import DeviceFacts, device_facts
from edgespec.errors import UserError
from edgespec.models import open_backend
from edgespec.profiler import PROFILE_SIZES, BackendProfile, measure

ENGINES = {"llamacpp": "llama_cpp", "onnx": "onnxruntime", "openvino": "openvino"}
SHOWN_SIZES = (2, 4, 8, 16, 32, 64)


def installed_backends(model: Path) -> list[str]:
    """The production engines installed here that can load ``model`` (not the reference:
    it is the exactness oracle, profiled only when asked)."""
    if model.is_dir():
        return [runtimes.backend_for(model)]
    return [name for name, module in ENGINES.items() if importlib.util.find_spec(module)]


def run_profile(model: Path, backends: list[str], threads: list[int], ctx: int,
                sizes: tuple[int, ...] = PROFILE_SIZES) -> dict:
    """Measure and save every backend × thread count; the ``--json`` document."""
    device = device_facts()
    report = {"schema": profile_store.SCHEMA, "device": device.as_dict(), "model": str(model),
              "backends": []}
    for name in backends:
        profiles = [_measure(model, name, t, ctx, sizes) for t in threads]
        saved = profile_store.save(device, model, profiles)
        report["backends"] += [p.as_dict() | {"saved": str(saved)} for p in profiles]
    return report


def _measure(model: Path, backend: str, threads: int, ctx: int,
             sizes: tuple[int, ...]) -> BackendProfile:
    engine = open_backend(model, backend, n_ctx=ctx, threads=threads)
    try:
        return measure(engine, sizes=sizes)
    finally:
        engine.close()


def device_table(device: DeviceFacts) -> Table:
    table = Table(title="this device", show_header=False)
    gib = 2**30
    rows = {
        "OS": device.os + (" (Android" + (", Termux)" if device.termux else ")")
                           if device.android else ""),
        "CPU": f"{device.cpu_model} ({device.machine})",
        "cores": f"{device.cores_physical} physical, {device.cores_logical} logical"
                 + "".join(f"; {c['cpus']} at {c['max_khz'] / 1e6:.2f} GHz"
                           for c in device.clusters),
        "CPU features": " ".join(device.isa) or "?",
        "llama.cpp build uses": " ".join(device.llamacpp_features) or "(not installed)",
        "llama.cpp devices": " ".join(device.llamacpp_devices) or "(not installed)",
        "memory": "?" if device.ram_total is None else
                  f"{device.ram_available / gib:.1f} of {device.ram_total / gib:.1f} GiB free, "
                  f"swap {(device.swap_total or 0) / gib:.1f} GiB",
        "battery": "none" if device.battery is None else
                   f"{device.battery['percent']}%, plugged in: {device.battery['plugged']}",
        "temperature": ", ".join(f"{k} {v:.0f} C" for k, v in device.thermal_c.items()) or "?",
        "OpenVINO devices": " ".join(device.openvino_devices) or "(not installed)",
        "ONNX Runtime providers": " ".join(device.onnxruntime_providers) or "(not installed)",
    }
    for key, value in rows.items():
        table.add_row(key, value)
    return table


def cost_table(report: dict) -> Table:
    table = Table(title="verify cost: c(n) / c(1) for n tokens in one call, after `ctx` cached")
    for column in ("backend", "thr", "ctx", "c(1) ms", *(f"n={n}" for n in SHOWN_SIZES),
                   "exact"):
        table.add_column(column, justify="left" if column == "backend" else "right",
                         no_wrap=True)
    for record in report["backends"]:
        profile = BackendProfile.from_dict(record)
        for context, curve in profile.cost.items():
            table.add_row(profile.backend, str(profile.threads), str(context),
                          f"{curve[1] * 1e3:.1f}",
                          *(f"{curve[n] / curve[1]:.2f}" if n in curve else "-"
                            for n in SHOWN_SIZES),
                          str(profile.exact))
    return table


def plot_curves(report: dict, path: Path) -> None:
    """c(n)/c(1) against n, one line per backend, thread count and context."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("--plot needs matplotlib (pip install 'edgespec[bench]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for record in report["backends"]:
        profile = BackendProfile.from_dict(record)
        for context, curve in profile.cost.items():
            sizes = sorted(curve)
            ax.plot(sizes, [curve[n] / curve[1] for n in sizes], marker="o",
                    label=f"{profile.backend}, {profile.threads} threads, {context} cached")
    ax.plot([1, 64], [1, 64], color="grey", linestyle=":", label="n × one token")
    ax.set(xscale="log", yscale="log", xlabel="tokens verified in one call (n)",
           ylabel="cost relative to one token", title=report["device"]["cpu_model"])
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def show(report: dict, console: Console) -> None:
    console.print(device_table(DeviceFacts(**report["device"])))
    console.print(cost_table(report))
    for path in sorted({r["saved"] for r in report["backends"]}):
        console.print(f"saved {path}")
