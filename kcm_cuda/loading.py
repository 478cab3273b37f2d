"""Model files checked before they are loaded, so that a broken model directory is a one-line
error that names the file and what is wrong with it, not a traceback from deep inside
transformers or safetensors. Used by ``kcm-prune``, ``kcm-eval`` and
``load_pruned``.

:func:`check_model_files` reads only the small parts: ``config.json`` (must parse as a JSON
object), and of every weights file the transformers loader would read, the safetensors header
(its length, its JSON, every tensor's byte range against the file's size: a truncated copy is
caught here) or, for ``pytorch_model.bin``, the zip directory at its end. No tensor data is
read, so it costs milliseconds for any model size.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

SAFE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the header size


class ModelFileError(ValueError):
    """A model file is missing, unreadable, truncated or corrupt (one line, names the file)."""


def check_config(directory: str | os.PathLike) -> dict:
    """The parsed ``config.json`` of ``directory``, or ModelFileError."""
    f = Path(directory) / "config.json"
    if not f.is_file():
        raise ModelFileError(f"{f} not found: {directory} is not a saved model")
    try:
        text = f.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ModelFileError(f"{f} is corrupt: not UTF-8 text") from None
    except OSError as exc:
        raise ModelFileError(f"{f} cannot be read: {exc.strerror or exc}") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        what = "is empty" if not text.strip() else f"does not parse as JSON ({exc})"
        raise ModelFileError(f"{f} {what}") from None
    if not isinstance(config, dict):
        raise ModelFileError(f"{f} is not a JSON object (a {type(config).__name__})")
    check_config_values(config, f)
    return config


# Size fields of the configs we read, and the largest value that can be a real model's (a
# bigger one would have transformers build a model for minutes before anything fails).
SIZE_FIELDS = {
    "num_hidden_layers": 1024,
    "n_layers": 1024,
    "hidden_size": 2**18,
    "dim": 2**18,
    "intermediate_size": 2**20,
    "hidden_dim": 2**20,
    "num_attention_heads": 2**12,
    "n_heads": 2**12,
    "num_key_value_heads": 2**12,
    "head_dim": 2**14,
    "vocab_size": 2**23,
    "max_position_embeddings": 2**24,
}
# per-layer records of our own outputs (kcm_cuda.pruning.physical): lists of counts
LIST_FIELDS = {"kcm_intermediate_sizes": 0, "kcm_attention_heads": 1, "kcm_key_value_heads": 1}
DTYPES = {
    "float32", "float", "float16", "half", "bfloat16", "float64", "double", "auto",
    "int8", "uint8", "int16", "int32", "int64", "bool", "float8_e4m3fn", "float8_e5m2",
}  # fmt: skip


def _non_finite(value, where: str):
    """The first NaN / inf number inside ``value`` (dicts and lists walked), as a path."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return where
    if isinstance(value, dict):
        for k, v in value.items():
            hit = _non_finite(v, f"{where}.{k}")
            if hit:
                return hit
    if isinstance(value, list):
        for i, v in enumerate(value):
            hit = _non_finite(v, f"{where}[{i}]")
            if hit:
                return hit
    return None


def check_config_values(config: dict, f: Path | str = "config.json") -> None:
    """ModelFileError naming the file and the field for values no model can have: a NaN or
    infinite number anywhere, an architectures entry that is not a list of names, a size
    field that is not a whole number in range (a string, a bool, 0, negative or absurd), a
    per-layer record that is not a list of counts, an unknown dtype. Read before anything is
    built."""
    for key, value in config.items():
        hit = _non_finite(value, key)
        if hit:
            raise ModelFileError(f"{f}: {hit} is {value!r}, not a finite number")
    archs = config.get("architectures")
    if archs is not None and (
        not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)
    ):
        raise ModelFileError(f"{f}: architectures must be a list of class names, got {archs!r}")
    for key, top in SIZE_FIELDS.items():
        value = config.get(key)
        if value is None:
            continue
        low = 0 if key == "intermediate_size" else 1
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= top:
            raise ModelFileError(
                f"{f}: {key} = {value!r} is not a whole number from {low} to {top}"
            )
    for key, low in LIST_FIELDS.items():
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and low <= v <= 2**20 for v in value
        ):
            raise ModelFileError(
                f"{f}: {key} must be a list of whole numbers >= {low} (one per layer), "
                f"got {value!r}"
            )
    for key in ("dtype", "torch_dtype"):
        value = config.get(key)
        if value is not None and (not isinstance(value, str) or value not in DTYPES):
            raise ModelFileError(f"{f}: {key} = {value!r} is not a dtype name")


def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The weights files the transformers loader reads from ``directory`` (safetensors first,
    as it does), or ModelFileError when there are none."""
    d = Path(directory)
    if (d / SAFE).exists():
        return [d / SAFE]
    for index in (SAFE_INDEX, BIN_INDEX):
        if (d / index).exists():
            return [d / name for name in _index_files(d / index)]
    if (d / BIN).exists():
        return [d / BIN]
    raise ModelFileError(
        f"{d} has no weights file ({SAFE}, {SAFE_INDEX}, {BIN} or {BIN_INDEX}): only a config"
    )


def _index_files(index: Path) -> list[str]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        names = sorted(set(data["weight_map"].values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise ModelFileError(f"{index} is corrupt: not a JSON index with a weight_map") from None
    if not names or not all(isinstance(n, str) for n in names):
        raise ModelFileError(f"{index} is corrupt: its weight_map names no files")
    return names


def check_safetensors(f: Path) -> None:
    """ModelFileError unless ``f`` has a whole safetensors header whose tensors all lie within
    the file."""
    if not f.is_file():
        raise ModelFileError(f"weights file {f} not found")
    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 0 or n > min(size - 8, _MAX_HEADER):
                raise ModelFileError(
                    f"{f} is truncated or not a safetensors file: {size} bytes, "
                    + ("too short for a header" if n < 0 else f"its header claims {n} bytes")
                )
            raw = fh.read(n)
    except OSError as exc:
        raise ModelFileError(f"{f} cannot be read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelFileError(f"{f} is corrupt: its safetensors header does not parse") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{f} is corrupt: its safetensors header is not a JSON object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            lo, hi = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelFileError(f"{f} is corrupt: tensor {name} has no data offsets") from None
        if not 0 <= lo <= hi:
            raise ModelFileError(f"{f} is corrupt: tensor {name} has offsets {lo}..{hi}")
        end = max(end, hi)
    if 8 + n + end > size:
        raise ModelFileError(
            f"{f} is truncated: {size} bytes, its header describes {8 + n + end} "
            "(an interrupted download or copy?)"
        )


def check_torch_bin(f: Path) -> None:
    """ModelFileError unless ``f`` is a whole zip-format torch checkpoint (or a legacy pickle)."""
    if not f.is_file():
        raise ModelFileError(f"weights file {f} not found")
    try:
        with open(f, "rb") as fh:
            magic = fh.read(2)
        if magic == b"PK":
            with zipfile.ZipFile(f):
                return
    except zipfile.BadZipFile:
        raise ModelFileError(
            f"{f} is truncated or corrupt (its zip directory is unreadable)"
        ) from None
    except OSError as exc:
        raise ModelFileError(f"{f} cannot be read: {exc.strerror or exc}") from None
    if magic[:1] != b"\x80":  # a legacy (pre-zip) torch pickle starts with the pickle opcode
        raise ModelFileError(f"{f} is not a PyTorch checkpoint (corrupt?)")


def check_weights(directory: str | os.PathLike) -> None:
    for f in weight_files(directory):
        if f.name.endswith(".safetensors"):
            check_safetensors(f)
        else:
            check_torch_bin(f)


def check_model_files(directory: str | os.PathLike, *, weights: bool = True) -> None:
    """ModelFileError (one line, naming the file) when ``directory``'s config does not parse
    or (``weights``) its weights files are missing, truncated or corrupt. Only local
    directories are checked; anything else (a hub name) is left to the loader."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        return
    check_config(d)
    if weights:
        check_weights(d)


def describe_load_error(name: object, exc: BaseException) -> str:
    """One line for a loader exception that got past the checks."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    return f"cannot load the model in {name}: {type(exc).__name__}: {first}"


def check_loading_info(model, info: dict, name: object) -> None:
    """ModelFileError when the checkpoint lacked tensors of the layers that are pruned or refit
    (transformers would fill them with random values, and say so only in a load report that
    kcm-prune hides): ``info`` is ``from_pretrained(..., output_loading_info=True)``'s."""
    missing = set(info.get("missing_keys") or ())
    if not missing:
        return
    try:
        from kcm_cuda.pruning.adapters import get_adapter

        adapter = get_adapter(model)
        names = {id(m): n for n, m in model.named_modules()}
        prefixes = tuple(names[id(b)] + "." for b in adapter.layers(model))
    except Exception:  # noqa: BLE001 - not a supported family: the pruner reports that itself
        return
    lost = sorted(k for k in missing if k.startswith(prefixes))
    if lost:
        more = f" and {len(lost) - 1} more" if len(lost) > 1 else ""
        raise ModelFileError(
            f"the weights in {name} lack {lost[0]}{more}: they would be random values; "
            "the weights file does not match config.json (incomplete or another model)"
        )
