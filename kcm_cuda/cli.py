"""``kcm-prune``: prune an encoder (BERT / DistilBERT / RoBERTa) or a decoder LM (LLaMA /
Mistral / Qwen2) — FFN neurons and attention heads — to a FLOPs budget with unlabeled data.

    kcm-prune MODEL --data FILE --flops 0.6 --output DIR [options]

Errors are reported as one line on stderr with exit status 2 (no traceback; set KCM_DEBUG=1
to see one), and nothing is written. The order is: arguments, the data file (read and checked),
the model's config and tokenizer (a model without tokenizer files, or a tokenizer that maps the
data to mostly unknown tokens, is an error), then the weights. A path that looks local never
goes to the hub; a hub name is looked up only when the hub answers within a few seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_ERROR = 2


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    from kcm_cuda.evaluation.runner import known_methods

    METHODS = known_methods()  # noqa: N806 - the method registry's names
    from kcm_cuda.pruning.options import PruneOptions

    default_method = PruneOptions().method  # what runs when nothing chooses one
    default_recon = PruneOptions().reconstruction()
    from kcm_cuda.pruning.d2 import D2_MODES
    from kcm_cuda.pruning.heads import GQA_STRUCTURES
    from kcm_cuda.pruning.merge import DEFAULT_MERGE, MERGES
    from kcm_cuda.pruning.r2 import R2_POINTS

    p = argparse.ArgumentParser(
        prog="kcm-prune",
        description=(
            "Label-free, gradient-free structured pruning of the FFN neurons (and attention "
            "heads) of a Hugging Face BERT / DistilBERT / RoBERTa model (a base model or one "
            "with a task "
            "head, e.g. *ForSequenceClassification) or the MLP channels of a LLaMA / Mistral / "
            "Qwen2 decoder LM (*ForCausalLM; statistics gathered one block at a time, so a "
            "model larger than the GPU prunes with --device-map auto), using unlabeled text "
            "only. Keeps the fraction C (--flops) of the transformer blocks' FLOPs (attention + "
            "FFN; FFN neurons are removed, and attention heads where the structure search "
            "measures that better on held-out rows, or with --heads), saves the physically pruned "
            "model (load it back with kcm_cuda.load_pruned(DIR); --layout standard: an ordinary "
            "checkpoint any loader reads) with its tokenizer and a JSON report. By default the "
            "neuron score (FLAP's or Wanda-sp's), the layer widths and the heads are measured "
            "per model by the structure search and every layer is refit by ridge least "
            "squares; the paper's KCM (Nova et al., ICML 2023) is --method kcm_paper."
        ),
        epilog=(
            "Data file formats: .txt (one text per line), .jsonl / .csv / .tsv (text column "
            "detected, or --text-column / --pair-column). Examples: kcm-prune ./bert-sst2 "
            "--data unlabeled.txt --flops 0.6 --output ./bert-sst2-pruned; kcm-prune "
            "./llama-7b --data calib.txt --flops 0.7 --max-length 512 --dtype bfloat16 "
            "--device-map auto --output ./llama-7b-pruned"
        ),
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help="local model directory, or a hub name (needs network; not with "
        "HF_HUB_OFFLINE=1 unless already cached)",
    )
    p.add_argument("--data", required=True, metavar="FILE", help="unlabeled text file")
    p.add_argument(
        "--flops",
        required=True,
        type=float,
        metavar="C",
        help="fraction of the FLOPs to keep, in (0, 1] (paper: 0.6, 0.7)",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="directory to save into")
    p.add_argument(
        "--method",
        default=None,
        choices=METHODS,
        help="which neurons to keep (default: measured, see --structure: flap (FLAP's "
        "standardised fluctuation) or wanda_sp, whichever prunes this model better; "
        f"{default_method} with --structure fixed); kcm_paper: the paper's mean-rank "
        "R2D2 + Scale; kcm: D2 votes with R2 breaking ties; d2, r2, magnitude, random; a "
        "method that needs labels (kwon) is for the Python API: prune(..., labels=))",
    )
    p.add_argument(
        "--structure",
        default="search",
        choices=("search", "fixed"),
        help="search (default): the parts of the structure not set by --method / --allocation "
        "/ --heads / --no-heads (heads on or off and the head/neuron split, the layer widths, "
        "the neuron score) are chosen per model: each candidate is judged on unlabeled rows "
        "held out from the sample (classifiers: KL to the unpruned model's outputs; LMs: "
        "held-out NLL) after a one-shot refit; the best is built with the one-shot and the full "
        "sequential refit and the better one is saved; the report's 'structure' block lists "
        "every candidate. fixed: uniform widths, heads at --flops <= 0.7, flap (faster, not "
        "measured on your model)",
    )
    p.add_argument(
        "--layout",
        default="per_layer",
        choices=("per_layer", "standard"),
        help="per_layer (default): each layer keeps its own FFN width and heads (load it with "
        "kcm_cuda.load_pruned; plain from_pretrained loads the zero-padded save at the widest "
        "layer's cost). standard: every layer the same FFN width and heads, so the output is "
        "an ordinary checkpoint of its architecture (smaller intermediate_size; decoders: "
        "num_attention_heads, num_key_value_heads, head_dim) that plain from_pretrained loads "
        "at its pruned size (tested; other engines: README's engine notes). BERT-like "
        "encoders keep whole "
        "heads there (their config cannot hold fewer); Mistral / Qwen2 are refit without a "
        "down_proj bias (their class has none)",
    )
    p.add_argument(
        "--samples",
        type=int,
        default=512,
        help="unlabeled sequences drawn from the file (default 512: on MiniLM, 512 lost "
        "nothing measurable against 2048 at c = 0.6 / 0.5 / 0.4 and prunes 3x faster)",
    )
    p.add_argument("--max-length", type=int, default=128, help="tokens per sequence (128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data sample (0)")
    p.add_argument(
        "--backend",
        default="auto",
        help="kernel backend: auto, cuda, triton, torch, reference (auto)",
    )
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1… (default: cuda if available, else cpu)"
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="weights' dtype when loading MODEL (auto: the checkpoint's own)",
    )
    p.add_argument(
        "--device-map",
        default=None,
        metavar="MAP",
        help="load MODEL with accelerate's device_map (e.g. auto: spread over the GPUs, the "
        "CPU and disk); the model is then pruned where it lies, one block at a time on "
        "--device (needs the accelerate package)",
    )
    p.add_argument(
        "--no-scale",
        action="store_true",
        help="no reconstruction at all after the selection: neither the default ridge refit "
        "nor Scale (the same as --reconstruct none; the name is historical)",
    )
    p.add_argument(
        "--reconstruct",
        default=None,
        metavar="R",
        help="what runs after the selection: none, bias (FLAP's bias compensation), scale "
        "(per-neuron rescaling), ridge (least-squares refit of the kept W2 columns and b2) "
        f"(default: {default_recon}, or the method's own, e.g. scale for kcm_paper; none with "
        "--no-scale)",
    )
    p.add_argument(
        "--allocation",
        choices=("auto", "global", "standardised", "uniform", "error"),
        default="auto",
        help="how the budget is split over layers: auto (default: measured with --structure "
        "search, else uniform widths under the ridge refit, the method's global sort "
        "otherwise), global, standardised, uniform (every layer keeps the same share), error "
        "(each layer's measured output error)",
    )
    heads = p.add_mutually_exclusive_group()
    heads.add_argument(
        "--heads",
        action="store_true",
        help="prune attention heads too, under the same FLOPs budget, at any --flops (default: "
        "with the ridge refit, --structure search measures heads on and off on your model; "
        "--structure fixed prunes heads at --flops 0.7 and below; grouped-query decoders: see "
        "--gqa-heads)",
    )
    heads.add_argument(
        "--no-heads", action="store_true", help="FFN neurons only, whatever the budget"
    )
    p.add_argument(
        "--export",
        choices=("onnx",),
        default=None,
        help="onnx: also write DIR/model.onnx (encoders; every layer at its pruned size, "
        "inputs input_ids / attention_mask [/ token_type_ids], dynamic batch and length), "
        "checked in ONNX Runtime against the pruned model (max |diff| <= 1e-4) before the "
        "output is published; needs pip install onnx onnxruntime onnxscript",
    )
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory/name (default: MODEL)")
    p.add_argument("--text-column", default=None, help="JSONL/CSV field holding the text")
    p.add_argument("--pair-column", default=None, help="JSONL/CSV field of the second text")
    p.add_argument(
        "--batch-size", type=int, default=32, help="sequences per forward batch (default 32)"
    )
    p.add_argument(
        "--min-keep",
        type=float,
        default=0.01,
        help="neurons kept per layer at least: a fraction < 1 of the layer, or a count >= 1 "
        "(default 0.01)",
    )
    p.add_argument(
        "--scale-samples",
        type=int,
        default=None,
        help="sequences the reconstruction (ridge refit or Scale) fits on (default: every "
        "calibration sequence, --samples)",
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "ieee", "tf32x3", "tf32"),
        help="kernel precision for R2 (auto: tf32 on sm_80+ GPUs, where the R2 ranking was "
        "measured unchanged; ieee elsewhere)",
    )
    x = p.add_argument_group(
        "experimental options",
        "research variants kept for the paper's pipeline (--method kcm_paper) and for studies; "
        "none beat the defaults (docs/RESULTS.md). Python: prune(..., experimental={...})",
    )
    x.add_argument(
        "--merge",
        default=DEFAULT_MERGE,
        choices=MERGES,
        help=f"R2D2 merge variant (default {DEFAULT_MERGE}: the best measured)",
    )
    x.add_argument(
        "--r2-points",
        default="output",
        choices=R2_POINTS,
        help="R2 points: output (W2 columns) or input ([W1 rows, b1])",
    )
    x.add_argument("--d2-mode", default="votes", choices=D2_MODES, help="D2 score")
    x.add_argument(
        "--scale-lambda",
        type=float,
        default=0.01,
        help="Scale ridge weight, relative to the normal matrix's mean diagonal",
    )
    x.add_argument(
        "--scale-retries",
        type=int,
        default=2,
        help="ridge x10 retries before a layer falls back to m = 1 (0: plain rule)",
    )
    x.add_argument(
        "--gqa-heads",
        default="per_group",
        choices=GQA_STRUCTURES,
        help="--heads on a grouped-query decoder: remove the same number of query heads from "
        "every group (per_group, default) or whole KV groups (groups)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show the third-party (transformers) load reports and warnings, hidden by default",
    )
    return p


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() not in ("", "0", "false", "no")


HUB_PROBE_TIMEOUT_S = 3.0


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the hub's host accepts a TCP connection within ``timeout`` seconds (a hub
    lookup without network otherwise retries for half a minute before failing)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def looks_local(name: str) -> bool:
    """A name that can only be a path: starts with . / ~, ends with a separator, has more than
    one '/', uses a backslash, or ends in a file-like suffix. Hub names are NAME or ORG/NAME."""
    if name.startswith((".", "/", "~")) or name.endswith(("/", os.sep)):
        return True
    if "\\" in name or os.sep in name.replace("/", "", 1) or name.count("/") > 1:
        return True
    return Path(name).suffix.lower() in (".txt", ".json", ".bin", ".safetensors", ".pt")


class ModelSource:
    """Where MODEL (and the tokenizer) come from: a local directory, or a hub name that is
    resolved from the local cache when the hub is unreachable or HF_HUB_OFFLINE is set."""

    def __init__(self, name: str, what: str = "model") -> None:
        self.name = name
        path = Path(name).expanduser()
        self.local = path.exists()
        if self.local:
            if not path.is_dir():
                raise CLIError(
                    f"{what} {name} is a file; expected a {what} directory or a hub name"
                )
            if not os.access(path, os.R_OK | os.X_OK):
                raise CLIError(f"{what} directory {name} is not readable (permission denied)")
            if what == "model" and not (path / "config.json").is_file():
                raise CLIError(f"model directory {name} has no config.json: not a saved model")
            self.path: str = str(path)
            self.cache_only = True
            self.why_cache_only = ""
            return
        if looks_local(name):
            raise CLIError(f"{what} directory not found: {name}")
        self.path = name
        if _offline():
            self.cache_only, self.why_cache_only = True, "HF_HUB_OFFLINE is set"
        elif not hub_reachable():
            self.cache_only = True
            self.why_cache_only = (
                f"the hub ({os.environ.get('HF_ENDPOINT', 'huggingface.co')}) did not answer "
                f"within {HUB_PROBE_TIMEOUT_S:g}s"
            )
        else:
            self.cache_only, self.why_cache_only = False, ""

    @property
    def kwargs(self) -> dict:
        return {"local_files_only": True} if self.cache_only else {}

    def not_found(self, what: str) -> CLIError:
        return CLIError(
            f"{what} {self.name!r} is not a local directory and not in the local hub cache, "
            f"and {self.why_cache_only} (no download)"
        )


def load_config(src: ModelSource):
    import transformers

    from kcm_cuda.loading import check_model_files

    if src.local:
        check_model_files(src.path, weights=False)  # one line naming config.json
    try:
        return transformers.AutoConfig.from_pretrained(src.path, **src.kwargs)
    except (OSError, ValueError) as exc:
        if not src.local and src.cache_only:
            raise src.not_found("model") from None
        raise CLIError(f"cannot load model config from {src.name}: {_first_line(exc)}") from None


def load_model(name: str | ModelSource, config=None, *, dtype: str = "auto", device_map=None):
    """The model (its architecture from config.json) from a local directory or a hub name;
    ``dtype``: "auto" (the checkpoint's) or a torch dtype name; ``device_map``: accelerate's."""
    import transformers

    src = name if isinstance(name, ModelSource) else ModelSource(name)
    config = config if config is not None else load_config(src)
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        cls = transformers.AutoModel
    kwargs = dict(src.kwargs)
    if dtype != "auto":
        import torch

        kwargs["dtype"] = getattr(torch, dtype)
    if device_map is not None:
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise CLIError(
                "--device-map needs the accelerate package: pip install accelerate"
            ) from None
        kwargs["device_map"] = device_map
    from kcm_cuda.loading import check_loading_info, check_weights
    from kcm_cuda.pruning.saving import load_pruned, needs_load_pruned

    if src.local:
        check_weights(src.path)  # missing, truncated, corrupt: one line naming the file
    if needs_load_pruned(config):  # one of our per-layer outputs: its real widths and heads
        if not src.local:
            raise CLIError(f"{src.name} is a kcm_cuda per-layer output: give its local directory")
        if device_map is not None:
            raise CLIError(
                f"{src.name} is a kcm_cuda per-layer output, which loads without --device-map "
                "(prune it with --layout standard to get a checkpoint accelerate can place)"
            )
        try:
            return load_pruned(src.path, dtype=None if dtype == "auto" else dtype)
        except ValueError as exc:
            raise CLIError(f"cannot load {src.name}: {_first_line(exc)}") from None
    try:
        model, info = cls.from_pretrained(src.path, **kwargs, output_loading_info=True)
    except Exception as exc:  # noqa: BLE001 - e.g. safetensors' own error type: one line
        raise CLIError(f"cannot load model weights from {src.name}: {_first_line(exc)}") from None
    check_loading_info(model, info, src.name)  # no randomly initialised layer to prune
    return model


# files one of which a saved tokenizer has (fast tokenizer, WordPiece, BPE, SentencePiece)
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def load_tokenizer(name: str | ModelSource, *, explicit: bool = False):
    """The tokenizer of a local directory or hub name. A local directory without any tokenizer
    file is an error (transformers would otherwise build a tokenizer with an empty vocabulary
    from the config alone, and every word would become the unknown token)."""
    import transformers

    src = name if isinstance(name, ModelSource) else ModelSource(name)
    flag = "--tokenizer" if explicit else "MODEL"
    if src.local:
        p = Path(src.path)
        if not any((p / f).is_file() for f in TOKENIZER_FILES) and not any(p.glob("*.model")):
            hint = "" if explicit else ": pass --tokenizer DIR (the directory it was saved with)"
            raise CLIError(
                f"{flag} {src.name} has no tokenizer files (none of "
                f"{', '.join(TOKENIZER_FILES)}){hint}"
            )
    try:
        return transformers.AutoTokenizer.from_pretrained(src.path, **src.kwargs)
    except Exception as exc:  # noqa: BLE001 - report "no tokenizer" as one line
        if not src.local and src.cache_only:
            raise src.not_found("tokenizer") from None
        raise CLIError(
            f"cannot load a tokenizer from {src.name} ({_first_line(exc)})"
            + ("" if explicit else ": pass --tokenizer DIR")
        ) from None


MAX_UNKNOWN_FRACTION = 0.5


def check_tokenizer(tok, texts: list, *, name: str, vocab_size: int | None = None) -> float:
    """Tokenise up to 256 of ``texts``; an error when more than MAX_UNKNOWN_FRACTION of the
    word tokens are the unknown token (a tokenizer that does not fit the model or the data),
    or when a token id falls outside the model's vocabulary. Returns the unknown fraction."""
    sample = texts[:256]
    if isinstance(sample[0], tuple):
        enc = tok([a for a, _ in sample], [b for _, b in sample], truncation=True, max_length=128)
    else:
        enc = tok(list(sample), truncation=True, max_length=128)
    special = set(getattr(tok, "all_special_ids", []) or [])
    unk = getattr(tok, "unk_token_id", None)
    n = n_unk = top = 0
    for ids in enc["input_ids"]:
        for i in ids:
            top = max(top, i)
            if i == unk:
                n_unk += 1
                n += 1
            elif i not in special:
                n += 1
    if n == 0:
        raise CLIError(f"the tokenizer of {name} turns the data into no tokens at all")
    frac = n_unk / n
    if frac > MAX_UNKNOWN_FRACTION:
        raise CLIError(
            f"the tokenizer of {name} maps {100 * frac:.0f}% of the data's tokens to the unknown "
            f"token {getattr(tok, 'unk_token', '?')!r} (vocabulary of {len(tok)}): it does not "
            "fit this model or data; pass --tokenizer DIR with the model's own tokenizer"
        )
    if vocab_size is not None and top >= vocab_size:
        raise CLIError(
            f"the tokenizer of {name} produces token id {top}, outside the model's vocabulary "
            f"of {vocab_size}: pass --tokenizer DIR with the model's own tokenizer"
        )
    return frac


def _quiet_third_party() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    import logging
    import warnings

    # transformers, and what --export onnx imports (torch.onnx, onnxscript, torchvision when
    # installed): their warnings are not the user's business unless --verbose
    for module in ("transformers", "torch.onnx", "onnxscript", "onnx_ir", "torchvision"):
        warnings.filterwarnings("ignore", module=module)
        logging.getLogger(module).setLevel(logging.ERROR)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _new_options(args: argparse.Namespace) -> dict:
    """--reconstruct / --heads, checked before the model loads; a method that needs labels is
    refused (kcm-prune reads unlabeled text only)."""
    from kcm_cuda.evaluation.runner import needs_labels

    if args.method is not None and needs_labels(args.method):
        raise CLIError(
            f"method {args.method} needs labels; kcm-prune reads unlabeled text only: use the "
            "Python API, kcm_cuda.prune(model, texts, flops, method=..., labels=...)"
        )
    extra: dict = {}
    if args.reconstruct is not None:
        extra["reconstruct"] = args.reconstruct
    if args.heads:
        extra["heads"] = True
    elif args.no_heads:
        extra["heads"] = False
    if args.allocation != "auto":
        extra["allocation"] = args.allocation
    return extra


def run(args: argparse.Namespace) -> int:
    """The output is never an input (nor contains / lies inside one), and one kcm-prune at a
    time writes it: checked and locked before anything else (kcm_cuda.pruning.safety)."""
    from kcm_cuda.pruning import safety

    inputs = {"input model": args.model, "tokenizer": args.tokenizer, "data file": args.data}
    out = Path(args.output).expanduser()
    safety.check_output_path(out, inputs)
    created = safety.prepare_output(out, overwrite=args.overwrite)  # before the long steps
    ok = False
    try:
        with safety.output_lock(out):
            rc = _run(args)
        ok = rc == 0
        return rc
    finally:
        if not ok:
            safety.remove_created(created)  # a failed run leaves no new directory behind


def _run(args: argparse.Namespace) -> int:
    from kcm_cuda.pruning import prune
    from kcm_cuda.pruning.data import read_texts
    from kcm_cuda.pruning.flops import check_flops

    check_flops(args.flops)  # fail fast, before loading anything
    if not args.verbose:
        _quiet_third_party()
    if args.quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    out = Path(args.output).expanduser()  # checked and locked by run() (safety.prepare_output)
    data = Path(args.data).expanduser()
    if not data.is_file():
        raise CLIError(f"data file not found: {args.data}")
    # the data is read and checked before anything is loaded (a model load takes seconds)
    texts = read_texts(data, args.text_column, args.pair_column)
    extra = _new_options(args)
    src = ModelSource(args.model)
    config = load_config(src)
    if args.export == "onnx":  # before the prune: its failure after minutes would waste them
        _check_onnx_export(config)
    if args.tokenizer:
        tok = load_tokenizer(ModelSource(args.tokenizer, "tokenizer"), explicit=True)
    else:
        tok = load_tokenizer(src)
    check_tokenizer(
        tok,
        texts,
        name=args.tokenizer or args.model,
        vocab_size=getattr(config, "vocab_size", None),
    )
    model = load_model(
        src,
        config,
        dtype=getattr(args, "dtype", "auto"),
        device_map=getattr(args, "device_map", None),
    )
    if args.export == "onnx":  # what the export refuses, said before the prune
        from kcm_cuda.onnx_export import unsupported_reason

        why = unsupported_reason(model)
        if why:
            raise CLIError(why.replace("export_onnx: ", "--export onnx: "))
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.method is not None:
        extra["method"] = args.method
    result = prune(
        model,
        texts,
        args.flops,
        structure=args.structure,
        layout=args.layout,
        scale=not args.no_scale,
        tokenizer=tok,
        samples=args.samples,
        max_length=args.max_length,
        seed=args.seed,
        backend=args.backend,
        device=device,
        progress=not args.quiet,
        batch_size=args.batch_size,
        scale_samples=args.scale_samples,
        experimental={
            "merge": args.merge,
            "r2_points": args.r2_points,
            "d2_mode": args.d2_mode,
            "scale_lambda": args.scale_lambda,
            "scale_retries": args.scale_retries,
            "gqa_heads": args.gqa_heads,
        },
        min_keep=int(args.min_keep) if args.min_keep >= 1 else args.min_keep,
        precision=args.precision,
        **extra,
    )
    result.report["source_model"] = args.model
    result.report["data_file"] = str(data)
    saved = result.save(out, overwrite=args.overwrite, onnx=args.export == "onnx")
    print(result.summary())
    print(structure_lines(result.report.get("structure") or {}))
    print(f"saved to {saved}")
    return 0


def _check_onnx_export(config) -> None:
    from kcm_cuda.onnx_export import DECODER_TYPES, missing_modules

    if getattr(config, "model_type", None) in DECODER_TYPES:
        raise CLIError(
            "--export onnx writes encoders; for a decoder use --layout standard (an ordinary "
            "checkpoint the engines' own exporters read: optimum, llama.cpp)"
        )
    missing = missing_modules()
    if missing:
        raise CLIError(f"--export onnx needs {', '.join(missing)}: pip install {' '.join(missing)}")


def structure_lines(block: dict) -> str:
    """What the structure search chose and its runner-up (or why it did not run)."""
    if not block.get("chosen"):
        return f"structure: fixed ({block.get('not_searched', 'not searched')})"
    crit = block.get("criterion")
    rows = block.get("judged_rows", block.get("heldout_rows"))
    how = f"{block['folds']}-fold cross-fitted" if block.get("folds") else "held-out"
    out = [
        f"structure: {block['chosen_label']} ({how} {crit} {block['chosen_criterion']:.4g}, "
        f"{len(block['candidates'])} candidates judged on {rows} rows)"
    ]
    for tie in (block.get("tie_rule") or {}).get("applied", []):
        out.append(
            f"tie rule: kept the simpler {tie['kept']} ({crit} +{tie['difference']:.3g}, "
            f"within its SE {tie['se']:.3g})"
        )
    runner = block.get("runner_up_label")
    if runner:
        value = next(
            (
                r.get("criterion")
                for r in block["candidates"]
                if r["structure"] == block["runner_up"]
            ),
            None,
        )
        out.append(f"runner-up: {runner}" + (f" ({crit} {value:.4g})" if value is not None else ""))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    from kcm_cuda._entry import interrupted

    try:  # building the parser imports torch: Ctrl-C there is one line too
        args = _parser().parse_args(argv)
    except KeyboardInterrupt as exc:
        return interrupted("kcm-prune", exc)
    debug = os.environ.get("KCM_DEBUG", "0") not in ("", "0")
    try:
        return run(args)
    except CLIError as exc:
        msg = str(exc)
    except (ValueError, TypeError, FileExistsError) as exc:
        if debug:
            raise
        msg = _first_line(exc)
    except OSError as exc:
        if debug:
            raise
        msg = f"{exc.strerror or _first_line(exc)}" + (f": {exc.filename}" if exc.filename else "")
    except (RuntimeError, MemoryError) as exc:  # e.g. out of memory: still one line
        if debug:
            raise
        msg = f"{type(exc).__name__}: {_first_line(exc)} (set KCM_DEBUG=1 for a traceback)"
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM under kcm_cuda._entry
        return interrupted("kcm-prune", exc)
    print(f"kcm-prune: error: {msg}", file=sys.stderr)
    return EXIT_ERROR


if __name__ == "__main__":
    from kcm_cuda._entry import kcm_prune

    kcm_prune()
