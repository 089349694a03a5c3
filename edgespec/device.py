"""What this device is: the facts a speculation policy and a memory plan depend on.

The same code sees very different verify-cost curves on two x86 CPUs, and a phone is not
a laptop: the profile records the device it was measured on, and its key decides whether
a saved profile still applies. Every probe degrades to "unknown" rather than failing:
psutil raises PermissionError on Android, and containers hide /sys.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# CPU flags that change which kernels run (x86 /proc/cpuinfo names, ARM "Features")
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
             "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx512vbmi", "amx_tile", "amx_int8",
             "amx_bf16", "asimd", "asimddp", "asimdhp", "i8mm", "sve", "sve2", "bf16")


@dataclass
class DeviceFacts:
    """One device, as ``edgespec profile`` reports it (``--json``'s ``device`` object)."""

    os: str
    machine: str
    android: bool
    termux: bool
    cpu_model: str
    cores_physical: int | None
    cores_logical: int | None
    clusters: list[dict[str, int]] = field(default_factory=list)  # big.LITTLE: max kHz → cpus
    isa: list[str] = field(default_factory=list)
    ram_total: int | None = None
    ram_available: int | None = None
    swap_total: int | None = None
    battery: dict[str, Any] | None = None
    thermal_c: dict[str, float] = field(default_factory=dict)
    llamacpp_features: list[str] = field(default_factory=list)
    llamacpp_devices: list[str] = field(default_factory=list)  # CPU, or Vulkan0, OpenCL…
    openvino_devices: list[str] = field(default_factory=list)
    onnxruntime_providers: list[str] = field(default_factory=list)

    def key(self) -> str:
        """What a saved profile must match (see :func:`device_key`)."""
        return _key(self.os, self.machine, self.cpu_model, self.cores_physical,
                    self.cores_logical, self.isa)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def device_key() -> str:
    """The CPU and its instruction sets, the core counts and the OS: what a saved profile
    must match. Free memory, battery and temperature vary and are not in it. Cheap: read
    at every load, without the engine probes of :func:`device_facts`."""
    return device_facts(engines=False).key()


def _key(*identity: object) -> str:
    return hashlib.sha256(repr(identity).encode()).hexdigest()[:16]


def device_facts(*, engines: bool = True) -> DeviceFacts:
    """Everything ``edgespec profile`` reports; ``engines=False``: only what identifies the
    device (no memory, sensors or engine probes)."""
    cpuinfo = _cpuinfo()
    facts = DeviceFacts(
        os=f"{platform.system()} {platform.release()}",
        machine=platform.machine(),
        android="ANDROID_ROOT" in os.environ or Path("/system/build.prop").exists(),
        termux="com.termux" in os.environ.get("PREFIX", ""),
        cpu_model=_cpu_model(cpuinfo),
        cores_physical=_psutil(lambda p: p.cpu_count(logical=False)),
        cores_logical=_psutil(lambda p: p.cpu_count()) or os.cpu_count(),
        clusters=_clusters(),
        isa=sorted(_flags(cpuinfo) & set(ISA_FLAGS)),
    )
    if engines:
        facts.ram_total = _psutil(lambda p: p.virtual_memory().total)
        facts.ram_available = _psutil(lambda p: p.virtual_memory().available)
        facts.swap_total = _psutil(lambda p: p.swap_memory().total)
        facts.battery = _psutil(_battery)
        facts.thermal_c = _psutil(_thermal) or {}
        facts.llamacpp_features = llamacpp_features()
        facts.llamacpp_devices = llamacpp_devices()
        facts.openvino_devices = _openvino_devices()
        facts.onnxruntime_providers = _onnxruntime_providers()
    return facts


def llamacpp_features() -> list[str]:
    """The CPU features the loaded llama.cpp build was compiled to use ("AVX512", …)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return []
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    return [part.split("=")[0].strip() for part in info.replace("CPU :", "|").split("|")
            if part.strip().endswith("= 1")]


def llamacpp_devices() -> list[str]:
    """The devices the llama.cpp build can compute on: "CPU", and e.g. "Vulkan0" for a
    GPU build (on Android: Vulkan or OpenCL). Read from ggml's device registry, which
    llama-cpp-python does not bind."""
    if importlib.util.find_spec("llama_cpp") is None:
        return []
    import ctypes

    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / _shared("ggml")))
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_dev_name.restype = ctypes.c_char_p
    lib.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
    return [lib.ggml_backend_dev_name(lib.ggml_backend_dev_get(i)).decode(errors="replace")
            for i in range(lib.ggml_backend_dev_count())]


def _shared(name: str) -> str:
    return {"darwin": f"lib{name}.dylib", "win32": f"{name}.dll"}.get(sys.platform,
                                                                       f"lib{name}.so")


def _psutil(read):
    """A psutil reading, or None where it is missing or refused (Android)."""
    try:
        import psutil

        return read(psutil)
    except (ImportError, AttributeError, OSError, NotImplementedError, RuntimeError):
        return None


def _battery(psutil) -> dict[str, Any] | None:
    battery = psutil.sensors_battery()
    if battery is None:
        return None
    return {"percent": round(battery.percent, 1), "plugged": battery.power_plugged}


def _thermal(psutil) -> dict[str, float]:
    return {name: max(t.current for t in temps)
            for name, temps in psutil.sensors_temperatures().items() if temps}


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def _cpu_model(cpuinfo: str) -> str:
    for key in ("model name", "Hardware", "Model", "cpu model"):
        for line in cpuinfo.splitlines():
            if line.startswith(key) and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _flags(cpuinfo: str) -> set[str]:
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")) and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


def _clusters() -> list[dict[str, int]]:
    """CPUs grouped by maximum frequency: a phone's big and little cores, where /sys says."""
    groups: dict[int, int] = {}
    for freq in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq/cpuinfo_max_freq"):
        try:
            khz = int(freq.read_text())
        except (OSError, ValueError):
            continue
        groups[khz] = groups.get(khz, 0) + 1
    return [{"max_khz": khz, "cpus": n} for khz, n in sorted(groups.items(), reverse=True)]


def _openvino_devices() -> list[str]:
    if importlib.util.find_spec("openvino") is None:
        return []
    import openvino

    return list(openvino.Core().available_devices)


def _onnxruntime_providers() -> list[str]:
    if importlib.util.find_spec("onnxruntime") is None:
        return []
    import onnxruntime

    return list(onnxruntime.get_available_providers())
