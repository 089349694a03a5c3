"""``edgespec profile``: device facts, measured curves saved per device + model + backend +
build, and a saved profile read at load instead of the start-up probe."""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

import edgespec
from edgespec import profile_store
from edgespec.device import device_facts
from edgespec.profile_cli import run_profile
from edgespec.profiler import BackendProfile

pytest.importorskip("llama_cpp")


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Profiles go to a fresh cache directory, never the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_device_facts_match_the_machine() -> None:
    device = device_facts()
    flags = next((line.split(":", 1)[1].split() for line in
                  Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), [])
    assert device.cpu_model and device.cores_logical and device.ram_total
    assert set(device.isa) <= set(flags)
    assert ("avx2" in flags) == ("avx2" in device.isa)
    if "avx2" in flags:
        assert "AVX2" in device.llamacpp_features
    assert device.llamacpp_devices[0] == "CPU"  # this build has no GPU backend
    assert device.key() == device_facts().key()  # free memory moves; the key does not


def test_a_profile_is_measured_saved_and_found_again(tiny_gguf: Path) -> None:
    report = run_profile(tiny_gguf, ["llamacpp"], threads=[1, 2], ctx=2304, sizes=(1, 2, 4, 8))
    assert [r["threads"] for r in report["backends"]] == [1, 2]
    record = report["backends"][0]
    assert Path(record["saved"]).is_file()
    assert set(record["cost"]) == {"300", "2000"} and record["exact"] >= 1
    device = device_facts()
    build = record["build"]
    found = profile_store.load(device.key(), tiny_gguf, "llamacpp", build, threads=2)
    assert found == BackendProfile.from_dict(report["backends"][1])
    assert profile_store.load(device.key(), tiny_gguf, "llamacpp", build, threads=3) is None
    assert profile_store.load(device.key(), tiny_gguf, "llamacpp", "another build", 2) is None


def test_a_corrupt_or_stale_profile_is_ignored_with_one_line(
        tiny_gguf: Path, caplog: pytest.LogCaptureFixture) -> None:
    device = device_facts()
    saved = profile_store.save(device, tiny_gguf, [_profile(exact=3)])
    for damage in ('{"schema": 1, "profiles": [{"backend": "llama', '{"schema": 0}',
                   '{"schema": 1, "profiles": [{"cost": {}}]}'):
        saved.write_text(damage)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="edgespec"):
            assert profile_store.load(device.key(), tiny_gguf, "llamacpp", "test build", 1) is None
        assert len(caplog.messages) == 1 and "edgespec profile" in caplog.messages[0]
        assert "\n" not in caplog.messages[0]


def test_load_uses_the_saved_profile_instead_of_probing(tiny_gguf: Path) -> None:
    """A profile whose exact size (3) no probe would find: the engine caps its trees there
    and starts from its cost curve."""
    with edgespec.load(tiny_gguf, threads=1, ctx=512) as engine:
        build = engine.backend.build
    profile = _profile(exact=3, build=build)
    profile_store.save(device_facts(), tiny_gguf, [profile])
    with edgespec.load(tiny_gguf, threads=1, ctx=512) as engine:
        engine.generate("Once upon a time", max_tokens=8)
        assert engine.tree_size == 3
        assert engine.profile == profile
    with edgespec.load(tiny_gguf, threads=2, ctx=512) as engine:  # not profiled: probes
        engine.generate("Once upon a time", max_tokens=8)
        assert engine.profile is None and engine.tree_size > 3
    with edgespec.load(tiny_gguf, threads=1, ctx=512, saved_profile=False) as engine:
        assert engine.saved_profile() is None  # told to ignore it: probes, as the bench's +probe
        engine.generate("Once upon a time", max_tokens=8)
        assert engine.profile is None and engine.tree_size > 3


def test_the_profile_command_prints_json_and_a_plot(tiny_gguf: Path, tmp_path: Path,
                                                   cache: Path) -> None:
    png = tmp_path / "curves.png"
    r = subprocess.run([sys.executable, "-m", "edgespec", "profile", str(tiny_gguf),
                        "--backend", "llamacpp", "--threads", "1", "-c", "2304", "--json",
                        "--plot", str(png)], capture_output=True, text=True, timeout=600,
                       env={**_env(), "XDG_CACHE_HOME": str(cache)})
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["device"]["cpu_model"] and report["backends"][0]["backend"] == "llamacpp"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = subprocess.run([sys.executable, "-m", "edgespec", "profile", str(tiny_gguf),
                            "--backend", "llamacpp", "--threads", "1", "-c", "2304"],
                           capture_output=True, text=True, timeout=600,
                           env={**_env(), "XDG_CACHE_HOME": str(cache), "COLUMNS": "200"})
    assert table.returncode == 0 and "verify cost" in table.stdout and "saved" in table.stdout


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def _profile(exact: int, build: str = "test build") -> BackendProfile:
    curve = {1: 0.010, 2: 0.011, 4: 0.013, 8: 0.020, 16: 0.035}
    return BackendProfile("llamacpp", build, 1, exact, {300: curve})


KILLED_WRITER = """
import itertools, sys
from pathlib import Path
from edgespec import profile_store
from edgespec.device import device_facts
from edgespec.profiler import BackendProfile

facts, model = device_facts(engines=False), Path(sys.argv[1])
cost = {c: {n: 1e-3 * n * (1 + c / 1e4) for n in range(1, 65)} for c in (300, 2000)}
for i in itertools.count():
    profile_store.save(facts, model, [BackendProfile("llamacpp", "killed", 1, 1 + i % 2, cost)])
    if i == 0:
        print("written", flush=True)
"""


def test_a_profile_write_killed_at_any_moment_leaves_a_whole_profile(
        tiny_gguf: Path, tmp_path: Path) -> None:
    """SIGKILL (no handler runs) at 40 moments while a process rewrites one profile as
    fast as it can: the profile it leaves always loads whole, with no warning, and the
    next write clears the temporaries the kills left."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    rng, seen = random.Random(0), set()
    for _ in range(40):
        writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tiny_gguf)],
                                  env=env, stdout=subprocess.PIPE, text=True)
        assert writer.stdout is not None and writer.stdout.readline() == "written\n"
        time.sleep(rng.uniform(0, 0.05))
        writer.kill()
        writer.wait()
        check = subprocess.run(
            [sys.executable, "-c", "import sys; from pathlib import Path; "
             "from edgespec import profile_store; from edgespec.device import device_key; "
             "p = profile_store.load(device_key(), Path(sys.argv[1]), 'llamacpp', 'killed', 1);"
             " print(p.exact)", str(tiny_gguf)], env=env, capture_output=True, text=True)
        assert check.returncode == 0 and not check.stderr, check.stderr  # no corrupt warning
        seen.add(int(check.stdout))
    assert seen == {1, 2}, "the kills did not land at different writes: the test proved little"
    # what the killed writers left behind goes at the next write, once it is old enough
    left = [p for p in tmp_path.rglob(".*.json.*") if p.is_file()]
    for path in left:
        os.utime(path, (time.time() - 120, time.time() - 120))
    subprocess.run([sys.executable, "-c", KILLED_WRITER.replace("itertools.count()", "range(1)"),
                    str(tiny_gguf)], env=env, check=True, capture_output=True)
    assert left and not [p for p in left if p.exists()], len(left)
