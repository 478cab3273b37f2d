"""Saving a pruned model (atomically) and loading it back in one call.

A save directory holds: ``config.json`` (the architecture; with per-layer widths also
``kcm_intermediate_sizes``, the FFN size of every layer), ``model.safetensors``, the tokenizer
files when a tokenizer is known, and ``kcm_report.json`` (strict JSON). It is written to a
temporary sibling directory and renamed into place, so a crash never leaves a half-written
model at ``path``; with ``overwrite`` the old and the new directory are exchanged atomically,
so ``path`` always holds one of them whole. One writer per output at a time (a lock next to
it); an output that is, contains or lies inside the directory the model was loaded from is
refused; a model with a NaN or infinite weight is not saved (kcm_cuda.pruning.safety).
``load_pruned`` checks the files first (kcm_cuda.loading): a corrupt or truncated one is a
one-line ValueError naming it.

By default (``padded=True``) every layer's FFN is stored zero-padded to the widest kept layer
(zero W1 rows, b1 entries and W2 columns: the padding neurons contribute exactly nothing) and
the config's own FFN-size field is that width, so plain ``AutoModelFor*.from_pretrained(path)``
also loads it, without kcm_cuda, giving the same outputs (but the FLOPs of the widest layer
in every layer). ``load_pruned(path)`` strips the padding using ``kcm_intermediate_sizes`` and
returns the physically pruned model. With ``padded=False`` each layer is stored at its own
size (smallest files); then only ``load_pruned`` can load it (plain ``from_pretrained`` raises
a size-mismatch error).

Pruned attention heads: ``config.kcm_attention_heads`` holds each layer's head count. The padded
save pads every layer back to the config's head count with all-zero heads (zero Q, K, V rows and
biases, zero O columns: such a head's context is softmax(0)·0 = 0 and adds exactly nothing);
``load_pruned`` checks that the padding is zero and strips it. Grouped-query attention
(decoders): ``config.kcm_key_value_heads`` holds each layer's KV-head count; the padded save
pads K and V back to the config's KV heads and puts each kept group's query heads at the start
of its group's slots (``FFNAdapter.padded_head_slots``), so query head i still reads KV head
i // g of the unpruned layout.

Decoders: LLaMA's refit gives down_proj a bias its class declares (``mlp_bias=True``, with zero
gate/up biases), so the padded save loads with plain ``from_pretrained``; Mistral's and Qwen2's
classes have no MLP bias, so their refit fits the weights alone (kcm_cuda.pruning.layout) and
their saves load plainly too. Forced with ``experimental refit_bias=True``, such a bias is
recorded as ``kcm_mlp_bias`` and the config's FFN width is saved as 0, so plain
``from_pretrained`` fails with a size mismatch rather than silently dropping the biases.

``layout="standard"`` outputs hold every layer alike in the config's own fields: an ordinary
checkpoint, no ``kcm_*`` record. ``load_pruned`` builds the model with its parameters on the
meta device and assigns the saved tensors (no random initialisation, one copy of the weights,
the saved dtype); ``needs_load_pruned(config)`` says whether a checkpoint is one of our
per-layer outputs, which kcm-prune and kcm-eval then read through it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from kcm_cuda.loading import check_model_files
from kcm_cuda.pruning import safety
from kcm_cuda.pruning.adapters import get_adapter
from kcm_cuda.pruning.physical import (
    HEADS_FIELD,
    KV_HEADS_FIELD,
    MLP_BIAS_FIELD,
    SIZES_FIELD,
    record_heads,
    record_sizes,
)

REPORT_NAME = "kcm_report.json"


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def finite_json(obj):
    """``obj`` with every NaN / infinity replaced by None (JSON has no such numbers; strict
    parsers reject the bare ``NaN`` json.dumps writes)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def report_json(report: dict) -> str:
    """The report as strict JSON (no bare NaN / Infinity, which strict parsers reject: an
    undefined number, such as an error ratio of a layer with nothing to refit, is null)."""
    plain = json.loads(json.dumps(report, default=_json_default))
    return json.dumps(finite_json(plain), indent=2, allow_nan=False)


def save_pruned(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    tokenizer: object | None = None,
    report: dict | None = None,
    overwrite: bool = False,
    padded: bool = True,
    protect: tuple = (),
    also: tuple = (),
) -> Path:
    """``protect``: paths of inputs the output must not be, contain or lie inside (the
    directory ``model`` was loaded from is always protected; kcm_cuda.pruning.safety).
    ``also``: callables given the directory being written, before it is published (e.g. an
    ONNX export beside the checkpoint): a failure leaves no output."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    target = Path(path).expanduser()
    if target.is_symlink():  # replace what the link points to, keep the link
        target = Path(os.path.realpath(target))
    safety.check_output_path(target, [*protect, *safety.model_sources(model)])
    safety.check_finite(model, what="the model to save: its", then="nothing was saved")
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"output path {target} already exists; pass overwrite=True (CLI: --overwrite)"
        )
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"output path {target} exists and is not a directory")
    parent = target.parent
    made = [d for d in (parent, *parent.parents) if not d.exists()]  # removed on a failure
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        safety.remove_created(list(reversed(made)))
        raise safety.save_error(exc, target, where=parent) from None
    try:
        return _save_into(
            model, target, parent, tokenizer, report, overwrite, padded, also
        )
    except BaseException:
        safety.remove_created(list(reversed(made)))
        raise


def _save_into(model, target, parent, tokenizer, report, overwrite, padded, also) -> Path:
    adapter = get_adapter(model)
    sizes = adapter.intermediate_sizes(model)
    if len(set(sizes)) > 1 or hasattr(model.config, SIZES_FIELD):
        record_sizes(model, adapter)  # per-layer widths: the record load_pruned reads
    else:  # every layer alike (a standard-layout or unpruned model): the stock field alone
        setattr(model.config, adapter.intermediate_field, sizes[0])
    heads = record_heads(model, adapter)
    full_heads = adapter.num_heads(model.config)
    kv_heads = adapter.kv_head_counts(model) if adapter.grouped else heads
    full_kv = adapter.num_kv_heads(model.config) if adapter.grouped else full_heads
    # A down_proj bias the family's class cannot hold (Mistral, Qwen2): plain from_pretrained
    # would drop it without an error, so such a model is saved for load_pruned only (below).
    bias_only_ours = bool(getattr(model.config, MLP_BIAS_FIELD, False))
    pad_ffn = padded and len(set(sizes)) > 1 and not bias_only_ours
    pad_heads = padded and (
        any(h != full_heads for h in heads) or any(h != full_kv for h in kv_heads)
    )
    if pad_ffn or pad_heads:
        model = copy.deepcopy(model)
        d_h = adapter.head_size(model.config)
        for block in adapter.layers(model):
            if pad_ffn:
                adapter.pad_ffn(block, max(sizes))
            if pad_heads:
                adapter.pad_heads(block, full_heads, d_h, full_kv if adapter.grouped else None)
        setattr(model.config, SIZES_FIELD, sizes)
        if pad_heads:
            setattr(model.config, HEADS_FIELD, heads)
            if adapter.grouped:
                setattr(model.config, KV_HEADS_FIELD, kv_heads)
    with safety.output_lock(target):  # one writer at a time; the old output stays whole
        safety.clean_stale(target)
        if target.exists() and not overwrite:
            raise FileExistsError(
                f"output path {target} already exists; pass overwrite=True (CLI: --overwrite)"
            )
        safety.check_free_space(parent, model, target)
        tmp = None
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{safety.TMP_TAG}", dir=parent))
            os.chmod(tmp, 0o777 & ~safety.current_umask())  # as mkdir would: mkdtemp is 0700
            model.save_pretrained(tmp, safe_serialization=True)
            if bias_only_ours:
                _refuse_plain_loading(tmp / "config.json", adapter.intermediate_field)
            if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(tmp)
            if report is not None:
                with open(tmp / REPORT_NAME, "w", encoding="utf-8") as f:
                    f.write(report_json(report))
            for write in also:
                write(tmp)
            safety.files_follow_umask(tmp)  # transformers writes model.safetensors 0600
            safety.publish(tmp, target, overwrite=overwrite)
        except BaseException as exc:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, (FileExistsError, safety.SaveError, KeyboardInterrupt, SystemExit)):
                raise
            if isinstance(exc, OSError) or "os error" in str(exc):
                raise safety.save_error(exc, target) from None
            raise
    return target


def _refuse_plain_loading(config_json: Path, field: str) -> None:
    """Set the config's FFN width to 0: plain ``from_pretrained`` then fails with a size
    mismatch instead of loading the model without its down_proj biases; ``load_pruned``
    reads the widths from the weights."""
    with open(config_json, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg[field] = 0
    with open(config_json, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


PER_LAYER_FIELDS = (SIZES_FIELD, HEADS_FIELD, KV_HEADS_FIELD, MLP_BIAS_FIELD)


def needs_load_pruned(config) -> bool:
    """Whether a checkpoint's config describes one of our per-layer outputs (padded or
    compact, any family): plain ``from_pretrained`` would load it at the padded width or fail
    with a size mismatch, so it must be read by :func:`load_pruned`. A standard-layout output
    is an ordinary checkpoint (False)."""
    return any(getattr(config, f, None) for f in PER_LAYER_FIELDS)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = path / "model.safetensors"
    if single.exists():
        return load_file(str(single))
    index = path / "model.safetensors.index.json"
    if index.exists():
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for name in files:
            state.update(load_file(str(path / name)))
        return state
    raise ValueError(f"{path} holds no model.safetensors: not a saved pruned model")


def load_report(path: str | os.PathLike) -> dict:
    """The report saved with the pruned model at ``path`` (``kcm_report.json``), its
    ``options`` block in the current layout (a report saved before the research variants moved
    into ``experimental`` gets them there: kcm_cuda.pruning.options.report_options)."""
    from kcm_cuda.pruning.options import report_options

    f = Path(path).expanduser() / REPORT_NAME
    try:
        with open(f, encoding="utf-8") as fh:
            report = json.load(fh)
    except FileNotFoundError:
        raise ValueError(f"{f} not found: {path} holds no kcm_cuda report") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{f} does not parse as JSON: {exc}") from None
    if not isinstance(report, dict):
        raise ValueError(f"{f} is not a JSON object")
    if isinstance(report.get("options"), dict):
        report["options"] = report_options(report["options"])
    return report


@contextlib.contextmanager
def _parameters_on_meta():
    """Build modules without memory for their parameters: every parameter registered while
    this is active is moved to the meta device as it is registered (so no random
    initialisation touches real memory); buffers (rotary frequencies, position ids) stay
    real. ``load_state_dict(..., assign=True)`` then puts the saved tensors in place."""
    register = nn.Module.register_parameter

    def on_meta(self, name, param):
        register(self, name, param)
        if param is not None and param.device.type != "meta":
            self._parameters[name] = nn.Parameter(
                param.detach().to("meta"), requires_grad=param.requires_grad
            )

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_dtype(dtype) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in set(DTYPES.values()):
        return dtype
    raise ValueError(
        f"dtype must be None, 'auto', {sorted(DTYPES)} or one of those torch dtypes, got "
        f"{dtype!r}"
    )


def load_pruned(
    path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> nn.Module:
    """The pruned model saved at ``path`` (eval mode, on ``device`` or the CPU), in the dtype
    it was saved in (``dtype=`` converts it: "float32", "bfloat16", "float16" or a torch
    dtype). The model is built without a random initialisation (parameters on the meta device
    until the saved tensors are assigned), so loading takes about one copy of the weights."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    want = _check_dtype(dtype)
    if device is not None:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(
                f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}"
            ) from None
        if dev.type == "meta":
            raise ValueError("device='meta' holds no weights: load on 'cpu' or 'cuda'")
    import transformers

    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(f"pruned model directory not found: {p}")
    if not os.access(p, os.R_OK | os.X_OK) or not (p / "config.json").is_file():
        raise ValueError(f"{p} is not a readable saved model (no readable config.json)")
    check_model_files(p)  # a corrupt, truncated or missing file: one line naming it
    try:
        config = transformers.AutoConfig.from_pretrained(str(p))
    except Exception as exc:  # noqa: BLE001 - transformers' own validation: one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])
        detail = " ".join(x.strip() for x in first[:3])
        raise ValueError(f"cannot read the model config in {p}/config.json: {detail}") from None
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise ValueError(f"config.json in {p} names no known architecture ({archs})")
    if getattr(config, MLP_BIAS_FIELD, False) and not getattr(config, "intermediate_size", 1):
        config.intermediate_size = 1  # saved as 0 (see _refuse_plain_loading); resized below
    try:
        with _parameters_on_meta():
            model = cls(config)
    except Exception as exc:  # noqa: BLE001 - e.g. a zero head count: one line naming the file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(
            f"config.json in {p} does not describe a buildable {archs[0]}: "
            f"{type(exc).__name__}: {first}"
        ) from None
    adapter = get_adapter(model)
    sizes = getattr(config, SIZES_FIELD, None)
    blocks = adapter.layers(model)
    if sizes is not None and len(sizes) != len(blocks):
        raise ValueError(f"{SIZES_FIELD} has {len(sizes)} entries for {len(blocks)} layers")
    head_counts = getattr(config, HEADS_FIELD, None)
    if head_counts is not None and (
        not isinstance(head_counts, list) or len(head_counts) != len(blocks)
    ):
        raise ValueError(f"{HEADS_FIELD} must list one head count for each of {len(blocks)} layers")
    kv_counts = getattr(config, KV_HEADS_FIELD, None) if adapter.grouped else None
    if kv_counts is not None and (not isinstance(kv_counts, list) or len(kv_counts) != len(blocks)):
        raise ValueError(
            f"{KV_HEADS_FIELD} must list one KV-head count for each of {len(blocks)} layers"
        )
    state = _load_state_dict(p)
    names = {id(mod): name for name, mod in model.named_modules()}
    d_h = adapter.head_size(config)
    stored = []
    stored_heads = []
    stored_kv = []
    for block in blocks:
        key = names[id(adapter.w1(block))] + ".weight"
        if key not in state:
            raise ValueError(f"weights in {p} lack {key}: not a model of this architecture")
        n = int(state[key].shape[0])
        stored.append(n)
        if adapter.w1(block).out_features != n:
            adapter.resize_ffn(block, n)
        qkey = names[id(adapter.q(block))] + ".weight"
        if qkey not in state:
            raise ValueError(f"weights in {p} lack {qkey}: not a model of this architecture")
        rows = int(state[qkey].shape[0])
        if rows % d_h or rows == 0:
            raise ValueError(f"{qkey} in {p} has {rows} rows: not a whole number of heads")
        stored_heads.append(rows // d_h)
        kv = rows // d_h
        if adapter.grouped:
            kkey = names[id(adapter.k(block))] + ".weight"
            kv_rows = int(state[kkey].shape[0]) if kkey in state else 0
            if kv_rows % d_h or kv_rows == 0 or (rows // d_h) % (kv_rows // d_h):
                raise ValueError(
                    f"{kkey} in {p} has {kv_rows} rows: not a whole number of KV heads that "
                    f"divides the {rows // d_h} query heads"
                )
            kv = kv_rows // d_h
        stored_kv.append(kv)
        if adapter.block_heads(block, d_h) != rows // d_h or (
            adapter.grouped and adapter.block_kv_heads(block, d_h) != kv
        ):
            adapter.resize_heads(block, rows // d_h, d_h, kv)
    if getattr(config, MLP_BIAS_FIELD, False):  # the refit's down_proj bias (Mistral, Qwen2)
        for block in blocks:
            adapter.ensure_w2_bias(block)
    if want is None:  # the saved dtype: the weights' own (one odd tensor is cast to it)
        counts: dict = {}
        for t in state.values():
            if t.is_floating_point():
                counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
        if len(counts) > 1:
            want = max(counts, key=counts.get)
    if want is not None:  # one tensor at a time: never two copies of the weights
        for k in list(state):
            if state[k].is_floating_point():
                state[k] = state[k].to(want)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # a shape that does not fit: one line
        first = str(exc).strip().splitlines()
        raise ValueError(
            f"weights in {p} do not match the architecture: {first[-1].strip() if first else exc}"
        ) from None
    del state
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if isinstance(getattr(model, "_tied_weights_keys", None), dict):
        tied = set(model._tied_weights_keys)
    real_missing = [k for k in missing if k not in tied and not _buffer_name(model, k)]
    if unexpected or real_missing:
        raise ValueError(
            f"weights in {p} do not match the architecture: missing {real_missing[:5]}, "
            f"unexpected {list(unexpected)[:5]}"
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still_empty = [n for n, t in model.named_parameters() if t.device.type == "meta"]
    if still_empty:
        raise ValueError(f"weights in {p} lack {still_empty[:5]}: not a complete saved model")
    # our saves never hold NaN / inf: a file that does was damaged (or not written by us)
    safety.check_finite(model, what=f"the model in {p}: its", then="it was not loaded")
    floats = {t.dtype for t in model.parameters() if t.is_floating_point()}
    if len(floats) == 1:
        model.config.dtype = next(iter(floats))
    if sizes is not None:  # strip the zero padding
        for i, (block, n, have) in enumerate(zip(blocks, sizes, stored, strict=True)):
            n = int(n)
            if n > have:
                raise ValueError(f"layer {i}: {SIZES_FIELD} says {n} neurons, stored {have}")
            if n < have:
                w1, w2 = adapter.w1(block), adapter.w2(block)
                with torch.no_grad():
                    pad_used = w1.weight[n:].abs().sum() + w2.weight[:, n:].abs().sum()
                if float(pad_used) != 0.0:
                    raise ValueError(f"layer {i}: the padding neurons in {p} are not zero")
                adapter.shrink_ffn(block, torch.arange(n))
    if head_counts is not None:  # strip the zero heads
        for i, (block, h, have) in enumerate(zip(blocks, head_counts, stored_heads, strict=True)):
            if isinstance(h, bool) or not isinstance(h, int) or not 1 <= h <= have:
                raise ValueError(f"layer {i}: {HEADS_FIELD} says {h!r} heads, stored {have}")
            have_kv = stored_kv[i]
            kv = kv_counts[i] if kv_counts is not None else (h if not adapter.grouped else have_kv)
            if adapter.grouped and (
                isinstance(kv, bool)
                or not isinstance(kv, int)
                or not 1 <= kv <= have_kv
                or h % kv
                or h // kv > have // have_kv
            ):
                raise ValueError(
                    f"layer {i}: {KV_HEADS_FIELD} says {kv!r} KV heads for {h} query heads, "
                    f"stored {have_kv} KV / {have} query heads"
                )
            if h < have or (adapter.grouped and kv < have_kv):
                _strip_zero_heads(adapter, block, h, kv, d_h, f"layer {i}", p)
    record_sizes(model, adapter)
    record_heads(model, adapter)
    model.eval()
    if device is not None:
        model.to(device)
    return model


@torch.no_grad()
def _strip_zero_heads(adapter, block, h: int, kv: int, d_h: int, where: str, p: Path) -> None:
    """Keep the block's ``h`` real query heads (``kv`` KV heads) of a zero-padded layout
    (``FFNAdapter.padded_head_slots``), after checking that everything else is zero."""
    have = adapter.block_heads(block, d_h)
    if adapter.grouped:
        have_kv = adapter.block_kv_heads(block, d_h)
        g, g_kept = have // have_kv, h // kv
        q_idx = (torch.arange(kv).unsqueeze(1) * g + torch.arange(g_kept)).flatten()
        kv_idx = torch.arange(kv)
    else:
        have_kv = have
        q_idx = kv_idx = torch.arange(h)
    q_pad = torch.ones(have, dtype=torch.bool)
    q_pad[q_idx] = False
    kv_pad = torch.ones(have_kv, dtype=torch.bool)
    kv_pad[kv_idx] = False
    q_rows = q_pad.repeat_interleave(d_h).to(adapter.q(block).weight.device)
    kv_rows = kv_pad.repeat_interleave(d_h).to(adapter.k(block).weight.device)
    used = adapter.o(block).weight[:, q_rows].abs().sum()
    for lin, rows in (
        (adapter.q(block), q_rows),
        (adapter.k(block), kv_rows),
        (adapter.v(block), kv_rows),
    ):
        used = used + lin.weight[rows].abs().sum()
        if lin.bias is not None:
            used = used + lin.bias[rows].abs().sum()
    if float(used) != 0.0:
        raise ValueError(f"{where}: the padding heads in {p} are not zero")
    adapter.shrink_heads(block, q_idx, d_h)


def _buffer_name(model: nn.Module, key: str) -> bool:
    return key in dict(model.named_buffers())
