"""A GGUF file as a model: converted once into a Hugging Face folder in the model cache.

    converted_folder(path)   the folder converted from a .gguf file (config.json, model.safetensors,
                             generation_config.json, the tokenizer and its chat template), keyed
                             by the file's content; converted on first use, then reused

transformers reads GGUF through the `gguf` package, dequantizing every tensor to torch, but a model
loaded that way refuses `save_pretrained`; so the conversion builds the same architecture from its
config, hands it the loaded tensors and saves that. Every stage, Ray worker and the chat service
then load a plain folder in a fraction of the time, and never parse the GGUF again.

The folder is in bread_ray's cache ($BREAD_CACHE, else ~/.cache/bread_ray), named by the file's
fingerprint (bread_ray.fingerprints: a sha256 over its bytes, computed once per version of the
file on a machine, the same as gives the file's identity in names). Torch-free at import:
bread_ray.model_sources, which resolves model names, imports it.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import sys
import time
from pathlib import Path

from bread_ray.fingerprints import cache_root, cached_fingerprint

GGUF_MAGIC = b"GGUF"
# Bump when the conversion changes: the version is part of the folder's name, so folders converted
# before are never mistaken for new ones (and processes of the old version keep theirs).
CONVERSION_VERSION = 1
# float32 keeps the dequantized tensors exactly as transformers computes them from the GGUF, so the
# folder is the same model (the same greedy tokens); load_causal_lm casts to bf16 on GPUs anyway.
DTYPE = "float32"
MANIFEST = "bread_gguf.json"  # written last: the source's fingerprint and the size of every file


class GGUFError(ValueError):
    """A file that is not a GGUF transformers can load: corrupt, truncated, or of an architecture
    it does not know. The message is one line naming the file."""


def converted_folder(gguf_path: str | Path) -> Path:
    """The Hugging Face folder converted from `gguf_path`, converting it if the cache has no
    complete conversion of these bytes.

    Conversion holds a lock on the folder's name, so a second process wanting the same folder
    waits and then finds it done; it is written to a staging folder beside its final place and
    renamed into it, so a crash never leaves a partial model there (a folder without a complete
    conversion is converted again). Raises GGUFError for a file transformers cannot load.
    """
    path = Path(gguf_path).expanduser().resolve()
    check_magic(path)
    digest = cached_fingerprint(path)
    root = cache_root()
    folder = root / f"gguf-{digest[:16]}-v{CONVERSION_VERSION}"
    if is_complete_conversion(folder, digest):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{folder.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another process converting {path.name} into {folder}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if is_complete_conversion(folder, digest):  # the other process finished it
            return folder
        start = time.monotonic()
        staging = root / f".converting-{folder.name}"
        shutil.rmtree(staging, ignore_errors=True)  # left by a conversion that crashed
        shutil.rmtree(folder, ignore_errors=True)  # incomplete: nobody can be using it
        try:
            convert(path, staging)
            files = {file.name: file.stat().st_size for file in staging.iterdir()}
            manifest = {"source": path.name, "fingerprint": digest, "conversion_version": CONVERSION_VERSION,
                        "dtype": DTYPE, "files": files}
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    say(f"converted {path.name} in {time.monotonic() - start:.0f} s: {folder}")
    return folder


def is_complete_conversion(folder: Path, digest: str) -> bool:
    """The folder holds a whole conversion of the file with this fingerprint: its manifest says so
    and every file has its size."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return manifest["fingerprint"] == digest and all(
            (folder / name).stat().st_size == size for name, size in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def convert(path: Path, out_dir: Path) -> None:
    """Write the Hugging Face folder of the GGUF file `path` into `out_dir`, saying what it does
    on stderr (transformers shows its own progress bars while dequantizing and writing)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from bread_ray.accelerator import name_the_accelerator

    name_the_accelerator()  # save_pretrained imports DeepSpeed, where it is installed

    try:  # the metadata alone, in seconds: a file that cannot be converted is refused before any work
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as error:  # transformers' errors for a bad GGUF are of many types
        raise why_unloadable(path, error) from None
    say(f"converting {path} ({path.stat().st_size / 1e6:.1f} MB) into a Hugging Face folder, once: "
        "reading and dequantizing its tensors, then its tokenizer")
    try:
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config,
                                                      dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as error:
        raise why_unloadable(path, error) from None
    say(f"writing model.safetensors ({DTYPE}), the tokenizer and its chat template")
    plain_config = loaded.config  # as loaded, less the GGUF quantization: the folder holds plain tensors
    del plain_config.quantization_config
    with torch.device("meta"):  # no second copy of the weights: the loaded tensors are assigned
        model = AutoModelForCausalLM.from_config(plain_config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)  # only saved: its meta buffers never run
    model.generation_config = loaded.generation_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def check_magic(path: Path) -> None:
    with path.open("rb") as handle:
        if handle.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise GGUFError(f"{path} is not a GGUF file: it does not start with the bytes 'GGUF'")


def why_unloadable(path: Path, error: Exception) -> GGUFError:
    """The error for a GGUF transformers failed to load: truncated or corrupt where the gguf
    package cannot read it either, else an architecture (or tokenizer) transformers cannot load."""
    from gguf import GGUFReader

    reason = first_line(error)
    try:
        architecture = GGUFReader(path).fields["general.architecture"].contents()
    except Exception as read_error:  # numpy's errors for data cut short are of many types
        return GGUFError(f"{path} is truncated or corrupt: the gguf package cannot read it ({first_line(read_error)})")
    return GGUFError(f"{path}: transformers cannot load this GGUF (architecture {architecture!r}): {reason}")


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def say(message: str) -> None:
    print(f"bread_ray: {message}", file=sys.stderr, flush=True)
