"""ONNX export of a pruned (or dense) encoder: ``export_onnx(result_or_model, path)``.

An ONNX graph stores every weight with its own shape, so a model with per-layer FFN widths
and head counts (``layout="per_layer"``) exports as it is and ONNX Runtime runs it at its
pruned size; no padding, no kcm_cuda at inference time.

The graph takes ``input_ids`` and ``attention_mask`` (and ``token_type_ids`` for BERT, whose
sentence pairs use them), int64, with a dynamic batch and sequence length, and returns the
model's outputs by name (``logits`` for a ``*ForSequenceClassification``, ``start_logits`` /
``end_logits`` for question answering, ``last_hidden_state`` for a bare encoder). It is
exported with torch's dynamo exporter (torch.export + onnxscript) and, unless ``check=False``,
run once in ONNX Runtime on inputs of another batch size and length than the export's:
outputs differing from the model's by more than ``atol`` (1e-4) are an error, so a file that
is written computes what the model computes. The file is written atomically (a temporary
sibling renamed into place). Needs the ``onnx`` extra: ``pip install onnx onnxruntime
onnxscript``.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

ONNX_NAME = "model.onnx"
OPSET = 18
EXAMPLE = (2, 16)  # batch, tokens of the export's example input
CHECK = (3, 11)  # another batch and length for the check
# outputs a caller reads; hidden states / attentions of every layer are not exported
OUTPUT_ORDER = ("logits", "start_logits", "end_logits", "last_hidden_state")


DECODER_TYPES = ("llama", "mistral", "qwen2")


def missing_modules(check: bool = True) -> list[str]:
    """The packages the export (and its ONNX Runtime check) needs that are not installed."""
    import importlib.util

    mods = ("onnx", "onnxscript", "onnxruntime") if check else ("onnx", "onnxscript")
    return [m for m in mods if importlib.util.find_spec(m) is None]


def unsupported_reason(model: nn.Module) -> str | None:
    """Why ``model`` cannot be exported (None: it can), said before any work: bfloat16
    weights (ONNX Runtime's CPU kernels cannot run them, so the graph could not be checked),
    a head whose inputs are not (batch, tokens), such as multiple choice."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if dtype == torch.bfloat16:
        return (
            "export_onnx: bfloat16 weights do not run in ONNX Runtime's CPU kernels (the graph "
            "could not be checked): export a float32 or float16 model (kcm-prune --dtype "
            "float32, or model.float())"
        )
    if type(model).__name__.endswith("ForMultipleChoice"):
        return (
            f"export_onnx: {type(model).__name__} reads (batch, choices, tokens) inputs; the "
            "export takes (batch, tokens) models: sequence or token classification, question "
            "answering, bare encoders"
        )
    return None


def _needs():
    missing = missing_modules(check=False)
    if missing:
        raise ImportError(
            f"export_onnx needs {' and '.join(missing)}: pip install onnx onnxruntime onnxscript "
            "(or the kcm_cuda[onnx] extra)"
        )


class _Graph(nn.Module):
    """The model with positional int64 inputs and a tuple of named outputs."""

    def __init__(self, model: nn.Module, outputs: tuple[str, ...]):
        super().__init__()
        self.model, self.outputs = model, outputs

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **extra
        )
        return tuple(out[k] for k in self.outputs)


def _example(model: nn.Module, names: tuple[str, ...], batch: int, length: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    vocab = int(getattr(model.config, "vocab_size", 100))
    ids = torch.randint(min(5, vocab - 1), vocab, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length - length // 3 :] = 0  # one padded row: the mask path is exported too
    values = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in names:
        tt = torch.zeros(batch, length, dtype=torch.long)
        tt[:, length // 2 :] = 1
        values["token_type_ids"] = tt
    return tuple(values[n] for n in names)


# the opsets torch's dynamo exporter writes (it starts at 18)
MIN_OPSET = 18
# the check's default tolerance per weight dtype (float16 rounds the logits at ~1e-3)
DEFAULT_ATOL = {torch.float32: 1e-4, torch.float16: 1e-2}


def _check_arguments(check, atol, opset, overwrite) -> None:
    for name, value in (("check", check), ("overwrite", overwrite)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    if atol is not None and (
        isinstance(atol, bool)
        or not isinstance(atol, (int, float))
        or not math.isfinite(atol)
        or atol < 0
    ):
        raise ValueError(f"atol must be a finite number >= 0, got {atol!r}")
    top = _max_opset()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= top:
        raise ValueError(f"opset must be a whole number from {MIN_OPSET} to {top}, got {opset!r}")


def _max_opset() -> int:
    try:
        import onnx

        return int(onnx.defs.onnx_opset_version())
    except Exception:  # noqa: BLE001 - onnx missing: _needs() says so next
        return 99


def _target(path: str | os.PathLike, model: nn.Module) -> Path:
    """The file to write: ``path``, or ``model.onnx`` inside it when it is a directory (an
    existing one, or a path written with a trailing separator, which must exist); never
    inside the directory the model was loaded from."""
    from kcm_cuda.pruning import safety

    text = os.fspath(path)
    if not str(text).strip():
        raise ValueError("path is empty: give the .onnx file (or its directory) to write")
    target = Path(path).expanduser()
    if target.is_dir() or str(text).endswith((os.sep, "/")):
        if not target.is_dir():
            raise FileNotFoundError(f"directory {target} does not exist")
        target = target / ONNX_NAME
    if not target.parent.is_dir():
        raise FileNotFoundError(f"directory {target.parent} does not exist")
    here = target.parent.resolve()
    for src in safety.model_sources(model):
        try:
            src = Path(src).resolve()
        except OSError:
            continue
        if here == src or src in here.parents:
            raise ValueError(
                f"{target} lies in the directory the model was loaded from ({src}): "
                "export elsewhere (the input model's files are never touched)"
            )
    return target


def _clean_stale(target: Path) -> None:
    """Remove the temporary files an export of ``target`` left when its process was killed
    (their names carry the writer's PID)."""
    for f in target.parent.glob(f".{target.name}.*.tmp"):
        parts = f.name[len(target.name) + 2 : -4].split(".")
        if not parts or not parts[0].isdigit():
            continue
        pid = int(parts[0])
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            f.unlink(missing_ok=True)
        except OSError:
            continue


def export_onnx(
    result_or_model,
    path: str | os.PathLike,
    *,
    check: bool = True,
    atol: float | None = None,
    opset: int = OPSET,
    overwrite: bool = False,
) -> Path:
    """Export a pruned encoder (a :class:`kcm_cuda.PruneResult` or the model itself: BERT,
    DistilBERT or RoBERTa, with or without a task head) to ONNX at ``path`` (a file; a
    directory gets ``model.onnx`` inside). Returns the file's path. ``atol``: the ONNX
    Runtime check's tolerance (default 1e-4 for float32 weights, 1e-2 for float16; bfloat16
    weights, which ONNX Runtime's CPU kernels do not run, are refused up front)."""
    from kcm_cuda.pruning.adapters import get_adapter

    model = getattr(result_or_model, "model", result_or_model)
    if not isinstance(model, nn.Module):
        raise TypeError(
            "export_onnx takes a PruneResult or a torch model, got "
            f"{type(result_or_model).__name__}"
        )
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    _check_arguments(check, atol, opset, overwrite)
    adapter = get_adapter(model)  # a clear error for a family we do not know
    if adapter.causal:
        raise ValueError(
            f"export_onnx exports encoders; a {adapter.name} decoder needs a KV-cache graph: "
            "prune it with layout='standard' and use the engines' own exporters (optimum, "
            "llama.cpp's convert_hf_to_gguf.py), which read the stock checkpoint"
        )
    why = unsupported_reason(model)
    if why:
        raise ValueError(why)
    _needs()
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if atol is None:
        atol = DEFAULT_ATOL.get(dtype, 1e-4)
    target = _target(path, model)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True")
    _clean_stale(target)
    names = ["input_ids", "attention_mask"]
    if getattr(model.config, "model_type", "") == "bert":
        names.append("token_type_ids")
    names = tuple(names)
    was_training = model.training
    model.eval()
    try:
        example = _example(model, names, *EXAMPLE, seed=0)
        with torch.no_grad():
            out = model(**dict(zip(names, example, strict=True)), return_dict=True)
        outputs = tuple(k for k in OUTPUT_ORDER if isinstance(out.get(k), torch.Tensor))
        if not outputs:
            raise ValueError(f"{type(model).__name__} returns none of {OUTPUT_ORDER}")
        graph = _Graph(model, outputs)
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
        dims = {n: {0: batch, 1: seq} for n in names}
        fd, tmp = tempfile.mkstemp(
            prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent
        )
        os.close(fd)
        try:
            import warnings

            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(
                    graph,
                    example,
                    input_names=list(names),
                    output_names=list(outputs),
                    dynamic_shapes=dims,
                    opset_version=opset,
                    dynamo=True,
                    verbose=False,
                )
            program.save(tmp)
            if check:
                _check_runtime(model, tmp, names, outputs, atol)
            from kcm_cuda.pruning.safety import current_umask

            os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it 0600
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    finally:
        model.train(was_training)
    return target


def _check_runtime(model, onnx_path: str, names, outputs, atol: float) -> None:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError(
            "export_onnx(check=True) runs the graph in onnxruntime: pip install onnxruntime "
            "(or pass check=False)"
        ) from None
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    x = _example(model, names, *CHECK, seed=1)
    got = session.run(list(outputs), {n: t.numpy() for n, t in zip(names, x, strict=True)})
    with torch.no_grad():
        ref = model(**dict(zip(names, x, strict=True)), return_dict=True)
    for name, y in zip(outputs, got, strict=True):
        want = ref[name].float().cpu().numpy()
        err = float(abs(y.astype("float32") - want).max())
        if not err <= atol:
            raise RuntimeError(
                f"the ONNX graph's {name} differs from the model's by {err:.3g} (> {atol:g}): "
                "not written"
            )
