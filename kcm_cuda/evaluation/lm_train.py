"""Train (once, cached) a small LLaMA-architecture causal LM on the project's shipped text.

No LLM checkpoint can be downloaded here, so the LM evaluation measures pruning on a small
model trained on this machine: a ``LlamaForCausalLM`` with grouped-query attention (8 query
heads, 2 KV heads), a gated SiLU MLP, RoPE and tied embeddings, and a byte-level BPE
tokenizer trained on the same train lines (lm_data.py). The numbers it gives are for that
small model, not for a real LLM.

Cached as a standard Hugging Face directory (``save_pretrained`` of the model and the
tokenizer, plus ``kcm_lm.json`` with the training record) under
``$KCM_CUDA_CACHE/lm/<digest>/`` (default ``~/.cache/kcm_cuda``), the digest covering the
text, the model config and the training settings. Written atomically (temp dir + rename). A
training cut short by ``time_budget_s`` is returned but never cached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kcm_cuda.evaluation.datasets import default_cache_dir
from kcm_cuda.evaluation.lm_data import LMText, encode_stream, train_tokenizer

__all__ = ["DEEP_LM_SETTINGS", "LMSettings", "load_small_lm", "train_small_lm"]

META_FILE = "kcm_lm.json"
ARCHITECTURES = ("llama", "qwen2")
CACHE_FORMAT = 1  # bump when the training code changes what a cached model is


@dataclass(frozen=True)
class LMSettings:
    """The small LM and how it is trained. Every field is part of the cache key."""

    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 704
    context: int = 128
    tie_embeddings: bool = True
    steps: int = 1400
    batch_size: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    eval_blocks: int = 64  # held-out blocks for the loss printed during training
    # "llama" (LlamaForCausalLM) or "qwen2" (Qwen2ForCausalLM: biases on Q, K and V)
    architecture: str = "llama"

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "context",
            "steps",
            "batch_size",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")


# The second, deeper LM (``kcm-eval --task lm-vader-deep``): another family (Qwen2: biases
# on Q, K and V), 8 layers of hidden 192 (6 query / 2 KV heads of 32, MLP 512), trained on
# the same shipped text; about the small LM's training cost.
DEEP_LM_SETTINGS = LMSettings(
    hidden_size=192,
    num_layers=8,
    num_heads=6,
    num_kv_heads=2,
    head_dim=32,
    intermediate_size=512,
    architecture="qwen2",
)


def _log(msg: str) -> None:
    print(msg, flush=True)  # progress must show while training, also when piped to a file


def model_config(settings: LMSettings, tokenizer):
    """The small LM's transformers config: LLaMA (no biases), or Qwen2 (Q/K/V biases, which
    its class always has; no sliding window)."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_kv_heads,
        head_dim=settings.head_dim,
        hidden_act="silu",
        max_position_embeddings=settings.context,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=settings.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if settings.architecture == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    return LlamaConfig(**common, attention_bias=False, mlp_bias=False)


def pack_blocks(stream: torch.Tensor, context: int) -> torch.Tensor:
    """Non-overlapping blocks of ``context`` tokens (the tail that does not fill one is
    dropped)."""
    n = stream.numel() // context
    if n == 0:
        raise ValueError(f"{stream.numel()} tokens do not fill one block of {context}")
    return stream[: n * context].view(n, context)


def _lr_at(step: int, s: LMSettings) -> float:
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    t = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def _block_loss(model, blocks: torch.Tensor, batch: int = 32) -> float:
    """Mean next-token NLL over the blocks (each block on its own)."""
    was = model.training
    model.eval()
    tot, n = 0.0, 0
    for i in range(0, blocks.shape[0], batch):
        b = blocks[i : i + batch]
        logits = model(input_ids=b).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1), reduction="sum"
        )
        tot += float(nll)
        n += b[:, 1:].numel()
    model.train(was)
    return tot / max(1, n)


def _dur(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def cache_key(text: LMText, settings: LMSettings) -> str:
    payload = {
        "format": CACHE_FORMAT,
        "text": text.fingerprint(("train", "test")),
        "settings": dataclasses.asdict(settings),
    }
    if settings.architecture == "llama":  # keys made before the field existed stay valid
        del payload["settings"]["architecture"]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def train_small_lm(
    text: LMText,
    settings: LMSettings | None = None,
    *,
    time_budget_s: float | None = None,
    log: Callable[[str], None] = _log,
    log_every: int = 50,
):
    """(model, tokenizer, meta): train the tokenizer and the LM from scratch on
    ``text.train``. ``time_budget_s``: stop early when the next step would pass it
    (``meta['cut_short']`` is then True)."""
    from transformers import AutoModelForCausalLM

    s = settings or LMSettings()
    t0 = time.perf_counter()
    torch.manual_seed(s.seed)
    tokenizer = train_tokenizer(text.train, vocab_size=s.vocab_size)
    t_tok = time.perf_counter() - t0
    train_blocks = pack_blocks(encode_stream(tokenizer, text.train), s.context)
    test_blocks = pack_blocks(encode_stream(tokenizer, text.test), s.context)
    eval_blocks = test_blocks[: s.eval_blocks]
    torch.manual_seed(s.seed)
    model = AutoModelForCausalLM.from_config(model_config(s, tokenizer))
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": s.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=s.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(s.seed)
    order = torch.randperm(train_blocks.shape[0], generator=gen)
    pos = 0
    log(
        f"small LM: {n_params / 1e6:.2f}M parameters, {train_blocks.shape[0]} train blocks of "
        f"{s.context} tokens, {s.steps} steps x {s.batch_size} blocks "
        f"({s.steps * s.batch_size / train_blocks.shape[0]:.1f} epochs), "
        f"torch threads {torch.get_num_threads()}"
    )
    t_train = time.perf_counter()
    cut_short = False
    curve = []
    ema = None
    step = 0
    for step in range(s.steps):
        if pos + s.batch_size > order.numel():
            order = torch.randperm(train_blocks.shape[0], generator=gen)
            pos = 0
        batch = train_blocks[order[pos : pos + s.batch_size]]
        pos += s.batch_size
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, s)
        out = model(input_ids=batch, labels=batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        loss = float(out.loss.detach())
        ema = loss if ema is None else 0.95 * ema + 0.05 * loss
        now = time.perf_counter()
        per_step = (now - t_train) / (step + 1)
        if (step + 1) % log_every == 0 or step + 1 == s.steps:
            msg = (
                f"  step {step + 1}/{s.steps}  loss {ema:.3f}  lr {_lr_at(step, s):.2e}  "
                f"{per_step:.2f}s/step  elapsed {_dur(now - t0)}  "
                f"ETA {_dur(per_step * (s.steps - step - 1))}"
            )
            if (step + 1) % (log_every * 10) == 0 or step + 1 == s.steps:
                held = _block_loss(model, eval_blocks)
                curve.append({"step": step + 1, "train_loss_ema": ema, "held_out_loss": held})
                msg += f"  held-out loss {held:.3f} (ppl {math.exp(held):.1f})"
            log(msg)
        if (
            time_budget_s is not None
            and (now - t0) + per_step > time_budget_s
            and step + 1 < s.steps
        ):
            cut_short = True
            log(f"WARNING: training cut short after {step + 1}/{s.steps} steps by the time budget")
            break
    train_s = time.perf_counter() - t_train
    model.eval()
    train_loss = _block_loss(model, train_blocks[order[: max(s.eval_blocks, 256)]])
    test_loss = _block_loss(model, test_blocks)
    meta = {
        "format": CACHE_FORMAT,
        "text": text.name,
        "text_source": text.source,
        "text_sizes": text.sizes(),
        "settings": dataclasses.asdict(s),
        "parameters": n_params,
        "steps_run": step + 1,
        "cut_short": cut_short,
        "tokenizer_seconds": t_tok,
        "train_seconds": train_s,
        "seconds": time.perf_counter() - t0,
        "torch_threads": torch.get_num_threads(),
        "train_tokens": int(train_blocks.numel()),
        "test_tokens": int(test_blocks.numel()),
        # block-wise (each 128-token block on its own, no carried context): a quick check,
        # the evaluation's sliding-window perplexity is in perplexity.py
        "train_block_ppl": math.exp(train_loss),
        "test_block_ppl": math.exp(test_loss),
        "curve": curve,
    }
    log(
        f"small LM trained in {_dur(meta['seconds'])} ({step + 1} steps); block perplexity "
        f"train {meta['train_block_ppl']:.1f}, held-out {meta['test_block_ppl']:.1f}"
    )
    return model, tokenizer, meta


def _save(dirpath: Path, model, tokenizer, meta: dict) -> None:
    dirpath.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dirpath.parent, prefix=dirpath.name + ".tmp"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=float))
        if dirpath.exists():
            shutil.rmtree(dirpath)
        os.replace(tmp, dirpath)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_small_lm(
    text: LMText,
    settings: LMSettings | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    time_budget_s: float | None = None,
    log: Callable[[str], None] = _log,
    log_every: int = 50,
):
    """(model, tokenizer, meta): the cached small LM for ``text`` and ``settings``, trained
    (and cached, unless cut short) on first use. ``meta['cache_path']`` is the directory."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    s = settings or LMSettings()
    cdir = default_cache_dir(cache_dir) / "lm" / cache_key(text, s)
    if use_cache and (cdir / META_FILE).is_file():
        meta = json.loads((cdir / META_FILE).read_text())
        model = AutoModelForCausalLM.from_pretrained(cdir)
        model.eval()
        # the BPE exactly as trained: AutoTokenizer would pick the family's own class from
        # config.json (Qwen2Tokenizer pre-tokenizes differently: 0.7 % more held-out tokens)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(cdir)
        meta.update(cached=True, cache_path=str(cdir))
        log(f"small LM: cached at {cdir}")
        return model, tokenizer, meta
    log(f"small LM: training (cache: {cdir})")
    model, tokenizer, meta = train_small_lm(
        text, s, time_budget_s=time_budget_s, log=log, log_every=log_every
    )
    meta["cached"] = False
    if use_cache and not meta["cut_short"]:
        _save(cdir, model, tokenizer, meta)
        meta["cache_path"] = str(cdir)
        log(f"small LM cached at {cdir}")
    return model, tokenizer, meta
