"""Running a model one layer block at a time over the calibration sample.

Every pass over the data (the activation statistics, the reconstruction) runs the model's
embedding part once, captures what it hands to its first block (the hidden states and the
other arguments: attention mask, rotary position embeddings, …) and then runs each block on
its own over all batches, the block's outputs becoming the next block's inputs. So peak
memory on the execution device is one block plus the sample's hidden states (kept on the CPU
when ``store`` says so), never the whole model, and each block can live anywhere:

* on the execution device: it runs as it is;
* on another device (the CPU, or another GPU of a model loaded with accelerate's
  ``device_map``): a GPU block runs where it is; a CPU block runs on a temporary copy on the
  execution device;
* offloaded by accelerate (its weights on the ``meta`` device, loaded by a hook): a temporary,
  hook-free copy with the real weights is made on the execution device.

The caller's model is only read: no block of it is moved, changed or left with a hook.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn


def model_inputs(model: nn.Module, batch: dict) -> dict:
    """Drop inputs the model's forward does not take (DistilBERT has no token_type_ids)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return batch
    return {k: v for k, v in batch.items() if k in params}


class _StopForward(Exception):
    pass


@dataclass
class LayerCall:
    """What the model passed to its first block for one batch: the other positional and
    keyword arguments (the hidden states are kept apart), and the batch's attention mask."""

    args: tuple
    kwargs: dict
    mask: torch.Tensor


def hidden_of(call: LayerCall) -> torch.Tensor:
    if call.args:
        return call.args[0]
    return call.kwargs["hidden_states"]


def move_to(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(move_to(x, device) for x in obj)
    if isinstance(obj, list):
        return [move_to(x, device) for x in obj]
    if isinstance(obj, dict):
        return {k: move_to(v, device) for k, v in obj.items()}
    return obj


def input_device(model: nn.Module) -> torch.device:
    """Where the model's token embeddings live (the inputs go there)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    p = next(emb.parameters(), None) if emb is not None else None
    if p is None or p.device.type == "meta":
        p = next((q for q in model.parameters() if q.device.type != "meta"), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    adapter,
    sample,
    batch_size: int,
    store: torch.device | None = None,
) -> tuple[list[LayerCall], list[torch.Tensor]]:
    """Per batch, the arguments the model passes to its first block and the hidden states
    (on ``store``, default: where they were made); the rest of the forward is skipped."""
    first = adapter.layers(model)[0]
    calls: list[LayerCall] = []
    hidden: list[torch.Tensor] = []
    current: dict[str, torch.Tensor] = {}

    def hook(_module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        hidden.append(h.to(store) if store is not None else h)
        kw = dict(kwargs)
        kw.pop("hidden_states", None)
        # a KV cache must not be filled by our repeated block calls
        for key in ("past_key_values", "past_key_value", "layer_past"):
            if key in kw:
                kw[key] = None
        if "use_cache" in kw:
            kw["use_cache"] = False
        calls.append(LayerCall(tuple(args[1:]) if args else (), kw, current["mask"]))
        raise _StopForward

    dev = input_device(model)
    extra = {"use_cache": False} if adapter.causal else {}
    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in sample.batches(batch_size, dev):
            current["mask"] = batch["attention_mask"]
            with contextlib.suppress(_StopForward):
                model(**model_inputs(model, batch), **extra)
    finally:
        handle.remove()
    return calls, hidden


def run_block(
    block: nn.Module, call: LayerCall, hidden: torch.Tensor, device: torch.device | None = None
) -> torch.Tensor:
    """The block's output hidden states for one batch (computed on ``device``, default: where
    ``hidden`` is; returned there)."""
    home = hidden.device
    dev = home if device is None else device
    args, kwargs = move_to(call.args, dev), move_to(call.kwargs, dev)
    h = hidden.to(dev)
    out = block(h, *args, **kwargs)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.to(home)


# -- where a block runs --------------------------------------------------------------------
def _real_params(module: nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.device.type != "meta"]


def is_offloaded(module: nn.Module) -> bool:
    """Some weights of ``module`` live on the meta device behind an accelerate hook."""
    return any(p.device.type == "meta" for p in module.parameters())


def _has_hooks(module: nn.Module) -> bool:
    return any("_hf_hook" in m.__dict__ for m in module.modules())


def block_device(block: nn.Module) -> torch.device:
    """Where a block's weights live (meta: offloaded → the CPU)."""
    ps = _real_params(block)
    return ps[0].device if ps else torch.device("cpu")


def detached_copy(module: nn.Module, device: torch.device | None = None) -> nn.Module:
    """A deep copy of ``module`` with real weights and no accelerate hooks (offloaded weights
    are loaded through the hooks while copying); ``module`` itself is left as it was."""
    if not _has_hooks(module):
        out = copy.deepcopy(module)
        return out.to(device) if device is not None else out
    with contextlib.ExitStack() as stack:
        if is_offloaded(module):
            from accelerate.utils import align_module_device, has_offloaded_params

            for m in module.modules():
                if has_offloaded_params(m):
                    stack.enter_context(align_module_device(m, device))
        hooks = [m.__dict__["_hf_hook"] for m in module.modules() if "_hf_hook" in m.__dict__]
        memo = {id(h): None for h in hooks}
        out = copy.deepcopy(module, memo)
    for m in out.modules():  # drop the hook plumbing the copy inherited
        for attr in ("_hf_hook", "forward", "_old_forward"):
            m.__dict__.pop(attr, None)
    if is_offloaded(out):
        raise RuntimeError("could not load the offloaded weights of a block (accelerate hook)")
    return out.to(device) if device is not None else out


@contextlib.contextmanager
def executing(block: nn.Module, device: torch.device) -> Iterator[tuple[nn.Module, torch.device]]:
    """(a module computing like ``block``, the device it runs on), without changing ``block``:
    the block itself when its weights are on ``device`` or another GPU; else a temporary copy
    on ``device`` (a CPU-resident or offloaded block)."""
    where = block_device(block)
    if not is_offloaded(block) and (where == device or where.type == "cuda"):
        yield block, where
        return
    tmp = detached_copy(block, device)
    try:
        yield tmp, device
    finally:
        del tmp


def skeleton_copy(model: nn.Module, adapter) -> nn.Module:
    """A deep copy of ``model`` without its layer blocks (each replaced by an empty
    placeholder, to be filled with :func:`set_block`), with real weights and no hooks."""
    blocks = adapter.layers(model)
    memo: dict[int, object] = {id(b): nn.Module() for b in blocks}
    if not _has_hooks(model):
        return copy.deepcopy(model, memo)
    with contextlib.ExitStack() as stack:
        if any(p.device.type == "meta" for n, p in _non_block_params(model, blocks)):
            from accelerate.utils import align_module_device, has_offloaded_params

            inside = {id(m) for b in blocks for m in b.modules()}
            for m in model.modules():
                if id(m) not in inside and has_offloaded_params(m):
                    stack.enter_context(align_module_device(m))
        for m in model.modules():
            if "_hf_hook" in m.__dict__:
                memo[id(m.__dict__["_hf_hook"])] = None
        out = copy.deepcopy(model, memo)
    for m in out.modules():
        for attr in ("_hf_hook", "forward", "_old_forward"):
            m.__dict__.pop(attr, None)
    if hasattr(out, "hf_device_map"):
        del out.hf_device_map
    return out


def _non_block_params(model: nn.Module, blocks: list[nn.Module]):
    inside = {id(p) for b in blocks for p in b.parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) not in inside]


def set_block(model: nn.Module, adapter, index: int, block: nn.Module) -> None:
    mod: nn.Module = adapter.base_model(model)
    for attr in adapter.layers_path:
        mod = getattr(mod, attr)
    mod[index] = block  # type: ignore[index]


# Hidden states of the whole sample stay on a GPU execution device when they take at most this
# share of its free memory; else they are kept on the CPU and moved per batch.
GPU_STORE_SHARE = 0.25


def hidden_store(model: nn.Module, adapter, sample, device: torch.device) -> torch.device:
    """Where the sample's hidden states are kept between blocks (two copies for the
    reconstruction's teacher and student)."""
    if device.type != "cuda":
        return torch.device("cpu") if device.type == "cpu" else device
    d = adapter.hidden_size(model.config)
    p = next(model.parameters())
    item = torch.finfo(p.dtype).bits // 8 if p.dtype.is_floating_point else 4
    need = 2 * sample.input_ids.numel() * d * item
    try:
        free, _total = torch.cuda.mem_get_info(device)
    except RuntimeError:
        return torch.device("cpu")
    return device if need <= GPU_STORE_SHARE * free else torch.device("cpu")


def is_placeholder(block: nn.Module) -> bool:
    """A block slot of a :func:`skeleton_copy` not filled yet."""
    return type(block) is nn.Module


def map_blocks(model: nn.Module, adapter, fn, device: torch.device | None = None) -> list:
    """``[fn(block) for each layer block]`` with each block's real weights at hand (an
    offloaded block is loaded, one at a time, on ``device`` or the CPU)."""
    out = []
    for block in adapter.layers(model):
        if is_offloaded(block):
            with executing(block, device or torch.device("cpu")) as (blk, _):
                out.append(fn(blk))
        else:
            out.append(fn(block))
    return out
