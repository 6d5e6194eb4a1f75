"""Checkpoints: Hugging Face model folders in and out, resumable training state, atomic writes.

Model folders use the layout transformers reads and writes (`config.json`,
`generation_config.json`, `model.safetensors` or shards plus `model.safetensors.index.json`),
so a folder saved here opens with `AutoModelForCausalLM.from_pretrained` and the reverse.
Weights are read with safetensors only: nothing here unpickles a downloaded file.

Crash safety. Every folder is written under a temporary sibling name and moved into place
only once complete. An existing folder is replaced by one atomic exchange of the two names
(Linux `renameat2(RENAME_EXCHANGE)`), so the final name holds a whole folder, old or new,
at every instant; the old one, now under the temporary name, is then deleted. Where the
file system cannot exchange names, it takes two renames (the old folder to an "aside" name,
then the new one to the final name): a kill between them leaves the aside copy, which
readers (`load_model`, `load_training_state`, `resolve_dir`) use when the final name is
missing and the next write to that path puts back first.
Two processes writing the same path at the same time is not supported.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import json
import os
import pickle
import random
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from r1lab.model.config import ModelConfig
from r1lab.model.hub import download, is_hub_id
from r1lab.model.transformer import Transformer, rope_inv_freq

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_WEIGHTS_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
TRAINER_STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
RNG_NAME = "rng.pt"

_TMP_TAG = ".tmp-"
_ASIDE_TAG = ".old-"
# Buffers some checkpoints carry that are recomputed from the config, never loaded.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_F32, _BF16, _F16 = torch.float32, torch.bfloat16, torch.float16
_DTYPES = {"float32": _F32, "fp32": _F32, "float": _F32, "bfloat16": _BF16, "bf16": _BF16}
_DTYPES.update(float16=_F16, fp16=_F16, half=_F16)


# ---- atomic writes ---------------------------------------------------------------------
def _fsync(path: Path) -> None:
    """Flush a file or a directory entry to disk (best effort: some platforms refuse dirs)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sibling(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}{tag}{os.getpid()}")


def _siblings(path: Path, tag: str) -> list[Path]:
    """Leftover temporary or aside copies of `path` (any process), oldest first."""
    found = path.parent.glob(f".{glob.escape(path.name)}{tag}*")
    return sorted(found, key=lambda p: p.stat().st_mtime)


def _pid_alive(pid_text: str) -> bool:
    try:
        os.kill(int(pid_text), 0)
    except (ValueError, ProcessLookupError):
        return False
    except (PermissionError, OSError):
        return True
    return True


@contextmanager
def _atomic_file(path: str | Path, mode: str) -> Iterator[IO]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, _TMP_TAG)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file so that readers see the old content or the new, never a torn file."""
    with _atomic_file(path, "w") as f:
        f.write(text)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """`torch.save` with the same all-or-nothing guarantee as `atomic_write_text`."""
    with _atomic_file(path, "wb") as f:
        torch.save(obj, f)


def resolve_dir(path: str | Path) -> Path:
    """`path`, or the copy an interrupted replacement left aside when `path` is missing."""
    path = Path(path)
    if path.exists():
        return path
    aside = _siblings(path, _ASIDE_TAG)
    return aside[-1] if aside else path


def _recover(path: Path) -> None:
    """Before writing `path`: restore a copy a killed replacement left aside, drop leftovers."""
    asides = _siblings(path, _ASIDE_TAG)
    if asides and not path.exists():
        os.replace(asides.pop(), path)
    for old in asides:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in _siblings(path, _TMP_TAG):
        if not _pid_alive(tmp.name.rsplit("-", 1)[-1]):
            shutil.rmtree(tmp, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names `a` and `b` in one atomic step; False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # not Linux, or a libc without renameat2
        return False
    at_cwd, exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False  # this file system cannot exchange names: fall back to two renames
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(new: Path, path: Path) -> None:
    if not path.exists():
        os.replace(new, path)
        _fsync(path.parent)
        return
    if _exchange(new, path):  # `path` is whole at every instant; `new` now holds the old
        _fsync(path.parent)
        shutil.rmtree(new, ignore_errors=True)
        return
    aside = _sibling(path, _ASIDE_TAG)
    os.replace(path, aside)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(aside, path)  # the process is alive: put the previous folder back
        raise
    _fsync(path.parent)
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a folder in a temporary sibling and move it to `path` only once it is complete.

    Yields the temporary folder to write into. If the block raises, the temporary folder is
    removed and `path` is untouched; a kill leaves a whole folder behind (module docstring).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover(path)
    tmp = _sibling(path, _TMP_TAG)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        _fsync(tmp)
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- dtypes ----------------------------------------------------------------------------
def as_dtype(value: str | torch.dtype) -> torch.dtype:
    """A torch dtype from a dtype or a name such as "bfloat16"."""
    if isinstance(value, torch.dtype):
        return value
    key = str(value).removeprefix("torch.").lower()
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {value!r}; use one of: auto, {', '.join(_DTYPES)}")
    return _DTYPES[key]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _load_dtype(dtype: str | torch.dtype | None, config: ModelConfig) -> torch.dtype | None:
    """The dtype to cast weights to; None keeps them as stored."""
    if dtype is None or dtype == "auto":
        stored = config.extra.get("dtype") or config.extra.get("torch_dtype")
        return as_dtype(stored) if stored else None
    return as_dtype(dtype)


# ---- saving models ---------------------------------------------------------------------
def _tensors_to_save(model: Transformer) -> dict[str, torch.Tensor]:
    from r1lab.model.lora import merged_state

    state = merged_state(model, model.state_dict())  # LoRA adapters merged into their weights
    if model.config.tie_word_embeddings:
        head, embed = state.pop("lm_head.weight"), state["model.embed_tokens.weight"]
        if head.data_ptr() != embed.data_ptr():
            raise ValueError(
                "config.tie_word_embeddings is set but lm_head.weight is not the embedding "
                "tensor; re-tie them (model.lm_head.weight = model.model.embed_tokens.weight)"
            )
    return state


def _plan_shards(
    tensors: dict[str, torch.Tensor], max_shard_bytes: int, dtype: torch.dtype | None
) -> list[list[str]]:
    """Names grouped in state-dict order; a tensor bigger than the limit gets its own shard."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * (dtype.itemsize if dtype and t.is_floating_point() else t.itemsize)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _cpu_copy(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A contiguous CPU tensor that owns its memory (safetensors refuses shared storage)."""
    out = t.detach().to(device="cpu", dtype=dtype if dtype and t.is_floating_point() else None)
    if out.data_ptr() == t.data_ptr():
        return out.clone(memory_format=torch.contiguous_format)
    return out.contiguous()


def save_model(
    model: Transformer,
    path: str | Path,
    tokenizer: Any = None,
    max_shard_bytes: int = 5 * 2**30,
    dtype: str | torch.dtype | None = None,
) -> Path:
    """Write `model` (and `tokenizer`) as a Hugging Face folder, atomically.

    `dtype` casts floating-point weights on the way out (None keeps the model's dtype). The
    tied `lm_head.weight` is not written, as transformers does. Shards are materialised on
    the CPU one at a time, so a big GPU model needs host memory for one shard only.
    """
    target = None if dtype in (None, "auto") else as_dtype(dtype)
    tensors = _tensors_to_save(model)
    shards = _plan_shards(tensors, max_shard_bytes, target)
    config = model.config.to_hf_dict()
    config["dtype"] = config["torch_dtype"] = _dtype_name(target or model.dtype)
    generation = {
        k: v
        for k, v in (
            ("bos_token_id", model.config.bos_token_id),
            ("eos_token_id", model.config.eos_token_id),
            ("pad_token_id", model.config.pad_token_id),
        )
        if v is not None
    }
    with atomic_dir(path) as tmp:
        if len(shards) == 1:
            names = {n: _cpu_copy(tensors[n], target) for n in shards[0]}
            save_file(names, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        else:
            weight_map, total = {}, 0
            for i, shard in enumerate(shards, 1):
                filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                part = {n: _cpu_copy(tensors[n], target) for n in shard}
                total += sum(t.numel() * t.itemsize for t in part.values())
                save_file(part, tmp / filename, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, filename))
                del part
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / GENERATION_CONFIG_NAME).write_text(json.dumps(generation, indent=2) + "\n")
        if tokenizer is not None:
            from r1lab.model.tokenizer import save_tokenizer

            save_tokenizer(tokenizer, tmp)
    return Path(path)


# ---- loading models --------------------------------------------------------------------
def resolve_model_dir(path: str | Path) -> Path:
    """The local model folder `path` names, whichever of these it is:

    a model folder; a stage run dir (its `model/`); a folder missing since a killed save
    (the copy left aside); or a Hugging Face Hub id (downloaded once, then cached).
    """
    in_run_dir = resolve_dir(Path(path) / "model")
    if (in_run_dir / CONFIG_NAME).exists():
        return in_run_dir
    local = resolve_dir(path)
    if local.is_dir():
        if local != Path(path):
            warnings.warn(
                f"{path} is missing; using {local}, left by an interrupted save", stacklevel=3
            )
        return local
    if local.exists():
        raise NotADirectoryError(f"{local} is a file; expected a model folder with {CONFIG_NAME}")
    if is_hub_id(path):
        return download(str(path))
    raise FileNotFoundError(
        f"model folder not found: {path} (a model folder, a stage run dir, or a hub id org/name)"
    )


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding the weights; never a pickle."""
    index = folder / WEIGHTS_INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index}: not a valid safetensors index ({err})") from err
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.exists():
                raise FileNotFoundError(f"shard {f.name} listed in {index} is missing ({f})")
        return files
    single = folder / WEIGHTS_NAME
    if single.exists():
        return [single]
    pickles = [n for n in PICKLE_WEIGHTS_NAMES if (folder / n).exists()]
    if pickles:
        raise ValueError(
            f"{folder} holds only {pickles[0]} (pickle); r1lab loads safetensors only, since "
            "unpickling can run arbitrary code. Convert it once from a trusted source, e.g. "
            "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder)"
        )
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in {folder}")


@contextmanager
def _open_weights(f: Path, device: str = "cpu"):
    """`safe_open`, with an error naming the file when it is empty, truncated or not
    safetensors (the library's own message names neither)."""
    try:
        handle = safe_open(f, framework="pt", device=device)
    except Exception as err:  # noqa: BLE001  (SafetensorError, OSError, ...)
        size = f.stat().st_size if f.exists() else 0
        what = "empty" if size == 0 else f"not a readable safetensors file ({size} bytes)"
        raise ValueError(
            f"{f}: {what}: {err}; the save was interrupted or the file is damaged: "
            "use another checkpoint or save it again"
        ) from None
    with handle as sf:
        yield sf


def _check_names_and_shapes(
    files: list[Path], expected: dict[str, tuple[int, ...]], tied: bool
) -> None:
    """Fail before reading any data if the files do not fit the config, naming the tensor."""
    found: dict[str, Path] = {}
    unexpected, mismatched = [], []
    for f in files:
        with _open_weights(f) as sf:
            for name in sf.keys():
                if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
                    continue
                if name not in expected:
                    unexpected.append(name)
                    continue
                shape = tuple(sf.get_slice(name).get_shape())
                if shape != expected[name]:
                    mismatched.append(
                        f"{name}: found {list(shape)}, expected {list(expected[name])} ({f.name})"
                    )
                found[name] = f
    if mismatched:
        raise ValueError(
            f"tensor shapes in {files[0].parent} do not match its {CONFIG_NAME}:\n  "
            + "\n  ".join(sorted(mismatched))
        )
    if unexpected:
        raise ValueError(
            f"tensors not used by this architecture in {files[0].parent}: {', '.join(unexpected)}"
        )
    missing = [n for n in expected if n not in found]
    if missing:
        raise ValueError(f"tensors missing from {files[0].parent}: {', '.join(missing)}")


def load_model(
    path: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> Transformer:
    """A `Transformer` from a Hugging Face folder (or a Hub id such as "Qwen/Qwen2.5-0.5B").

    `dtype`: a torch dtype, a name ("bfloat16", "float32"), or "auto"/None for the dtype the
    config records (weights as stored when it records none). The model is built on the meta
    device and the checkpoint tensors are adopted as its parameters, so no memory or time
    goes into a random init that would be overwritten.
    """
    folder = resolve_model_dir(path)
    config = ModelConfig.from_file(folder / CONFIG_NAME)
    files = _weight_files(folder)
    target = _load_dtype(dtype, config)
    device = torch.device(device or "cpu")

    with torch.device("meta"):
        model = Transformer(config)
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    _check_names_and_shapes(files, expected, config.tie_word_embeddings)

    state = {}
    for f in files:
        with _open_weights(f, str(device)) as sf:
            for name in sf.keys():
                if name in expected:
                    try:
                        t = sf.get_tensor(name)
                    except Exception as err:  # noqa: BLE001
                        raise ValueError(f"{f}: tensor {name} cannot be read ({err})") from None
                    state[name] = t.to(target) if target and t.is_floating_point() else t
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(config).to(device)  # recomputed: built on meta above
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"not initialised after loading: {', '.join(left)}")
    for name, t in model.named_parameters():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(
                f"{folder}: weight {name} holds NaN or infinite values (a diverged training "
                "run?); sampling or training from it is meaningless: use an earlier checkpoint"
            )
    return model


# ---- training state --------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Every random generator a training step may draw from, in a weights_only-safe form."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
    except ImportError:
        np = None
    if np is not None:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(gauss),
        }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured (generators absent on this machine are skipped)."""
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:
            np = None
        if np is not None:
            s = state["numpy"]
            np.random.set_state(
                (
                    s["kind"],
                    s["keys"].numpy().astype(np.uint32),
                    s["pos"],
                    s["has_gauss"],
                    s["cached_gaussian"],
                )
            )
    if "cuda" in state and torch.cuda.is_available():
        saved = state["cuda"][: torch.cuda.device_count()]
        for i, s in enumerate(saved):
            torch.cuda.set_rng_state(s, i)


def _load_own(path: Path, allow_pickle: bool = False) -> Any:
    """torch.load of a file this module wrote; weights_only unless the caller allows more."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not allow_pickle:
            raise
        # Scheduler state can hold plain Python objects (e.g. callable schedules). The file
        # is one this run wrote, not a download, so a full load is acceptable here.
        return torch.load(path, map_location="cpu", weights_only=False)


def save_training_state(
    path: str | Path,
    *,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any = None,
    step: int,
    data_position: Any,
    extra: dict | None = None,
) -> Path:
    """Everything needed to resume training except the weights, written atomically.

    `path` is the state folder (`<run>/<stage>/state`). `data_position` and `extra` must be
    JSON-serialisable; they land in `trainer_state.json`, readable without torch.
    """
    meta = {"step": int(step), "data_position": data_position, "extra": extra or {}}
    try:
        text = json.dumps(meta, indent=2) + "\n"
    except TypeError as err:
        raise TypeError(f"data_position and extra must be JSON-serialisable: {err}") from err
    with atomic_dir(path) as tmp:
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_NAME)
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / SCHEDULER_NAME)
        torch.save(rng_state(), tmp / RNG_NAME)
        (tmp / TRAINER_STATE_NAME).write_text(text)  # last: its presence marks a whole folder
    return Path(path)


def load_training_state(
    path: str | Path,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore optimizer, scheduler and RNG state in place; return step, data_position, extra."""
    folder = resolve_dir(path)
    state_file = folder / TRAINER_STATE_NAME
    if not state_file.exists():
        raise FileNotFoundError(f"training state not found: {state_file}")
    meta = json.loads(state_file.read_text())
    if optimizer is not None:
        if not (folder / OPTIMIZER_NAME).exists():
            raise FileNotFoundError(f"no optimizer state in {folder}")
        optimizer.load_state_dict(_load_own(folder / OPTIMIZER_NAME))
    if scheduler is not None:
        if not (folder / SCHEDULER_NAME).exists():
            raise FileNotFoundError(f"no scheduler state in {folder}")
        scheduler.load_state_dict(_load_own(folder / SCHEDULER_NAME, allow_pickle=True))
    if restore_rng:
        set_rng_state(_load_own(folder / RNG_NAME))
    return {
        "step": meta["step"],
        "data_position": meta["data_position"],
        "extra": meta.get("extra", {}),
    }


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The resumable state folder of a stage run (`<run_dir>/state`), or None if there is none."""
    folder = resolve_dir(Path(run_dir) / "state")
    return folder if (folder / TRAINER_STATE_NAME).exists() else None
