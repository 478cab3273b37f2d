"""``kcm-prune``: prune a BERT / DistilBERT model's FFN neurons with unlabeled data.

    kcm-prune MODEL --data FILE --flops 0.6 --output DIR [options]

Errors are reported as one line on stderr with exit status 2 (no traceback; set KCM_DEBUG=1
to see one).
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
    from kcm_cuda.pruning.api import METHODS
    from kcm_cuda.pruning.d2 import D2_MODES
    from kcm_cuda.pruning.merge import DEFAULT_MERGE, MERGES
    from kcm_cuda.pruning.r2 import R2_POINTS

    p = argparse.ArgumentParser(
        prog="kcm-prune",
        description=(
            "Gradient-free structured pruning (KCM, Nova et al. 2023) of the FFN neurons of a "
            "Hugging Face BERT / DistilBERT model, using unlabeled text only. Keeps the fraction "
            "C (--flops) of the encoder's FLOPs (attention + FFN; only FFN neurons are removed), "
            "saves the physically pruned model (load it back with "
            "kcm_cuda.load_pruned(DIR)) with its tokenizer and a JSON report."
        ),
        epilog=(
            "Data file formats: .txt (one text per line), .jsonl / .csv / .tsv (text column "
            "detected, or --text-column / --pair-column). Example: kcm-prune ./bert-sst2 "
            "--data unlabeled.txt --flops 0.6 --output ./bert-sst2-pruned"
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
        default="kcm",
        choices=METHODS,
        help="neuron scores: kcm (R2D2, default), r2, d2, magnitude, random",
    )
    p.add_argument(
        "--samples",
        type=int,
        default=2048,
        help="unlabeled sequences drawn from the file (default 2048)",
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
    p.add_argument("--no-scale", action="store_true", help="skip the Scale rescaling step")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory/name (default: MODEL)")
    p.add_argument("--text-column", default=None, help="JSONL/CSV field holding the text")
    p.add_argument("--pair-column", default=None, help="JSONL/CSV field of the second text")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward batch")
    p.add_argument(
        "--merge",
        default=DEFAULT_MERGE,
        choices=MERGES,
        help=f"R2D2 merge variant (default {DEFAULT_MERGE}: the best measured)",
    )
    p.add_argument(
        "--r2-points",
        default="output",
        choices=R2_POINTS,
        help="R2 points: output (W2 columns) or input ([W1 rows, b1])",
    )
    p.add_argument("--d2-mode", default="votes", choices=D2_MODES, help="D2 score")
    p.add_argument(
        "--scale-lambda",
        type=float,
        default=0.01,
        help="Scale ridge weight, relative to the normal matrix's mean diagonal",
    )
    p.add_argument(
        "--scale-retries",
        type=int,
        default=2,
        help="ridge x10 retries before a layer falls back to m = 1 (0: plain rule)",
    )
    p.add_argument(
        "--min-keep",
        type=float,
        default=0.01,
        help="neurons kept per layer at least: a fraction < 1 of the layer, or a count >= 1",
    )
    p.add_argument("--scale-samples", type=int, default=256, help="sequences used by Scale")
    p.add_argument(
        "--precision",
        default="ieee",
        choices=("ieee", "tf32x3", "tf32"),
        help="kernel precision for R2 (ieee)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() not in ("", "0", "false", "no")


def load_model(name: str):
    """Model + tokenizer (or None) from a local directory or a hub name."""
    import transformers

    path = Path(name).expanduser()
    local = path.exists()
    if local:
        if not path.is_dir():
            raise CLIError(f"MODEL {name} is a file; expected a model directory or a hub name")
        if not os.access(path, os.R_OK | os.X_OK):
            raise CLIError(f"model directory {name} is not readable (permission denied)")
        if not (path / "config.json").is_file():
            raise CLIError(f"model directory {name} has no config.json: not a saved model")
    elif name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise CLIError(f"model directory not found: {name}")
    kwargs = {"local_files_only": True} if (local or _offline()) else {}
    try:
        config = transformers.AutoConfig.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        if not local and _offline():
            raise CLIError(
                f"model {name!r} is not a local directory and not in the cache, and "
                "HF_HUB_OFFLINE is set (no download)"
            ) from None
        raise CLIError(f"cannot load model config from {name}: {_first_line(exc)}") from None
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        cls = transformers.AutoModel
    try:
        model = cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CLIError(f"cannot load model weights from {name}: {_first_line(exc)}") from None
    return model


def load_tokenizer(name: str):
    import transformers

    kwargs = {"local_files_only": True} if (Path(name).exists() or _offline()) else {}
    try:
        return transformers.AutoTokenizer.from_pretrained(name, **kwargs)
    except Exception:  # noqa: BLE001 - report "no tokenizer" as one line
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def run(args: argparse.Namespace) -> int:
    from kcm_cuda.pruning import prune
    from kcm_cuda.pruning.flops import check_flops

    check_flops(args.flops)  # fail fast, before loading anything
    if args.quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    out = Path(args.output).expanduser()
    if out.exists() and not args.overwrite:
        raise CLIError(f"output directory {out} already exists (use --overwrite to replace it)")
    data = Path(args.data).expanduser()
    if not data.is_file():
        raise CLIError(f"data file not found: {args.data}")
    model = load_model(args.model)
    tok = load_tokenizer(args.tokenizer or args.model)
    if tok is None:
        raise CLIError(f"no tokenizer found for {args.tokenizer or args.model}: pass --tokenizer")
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    result = prune(
        model,
        str(data),
        args.flops,
        method=args.method,
        scale=not args.no_scale,
        tokenizer=tok,
        samples=args.samples,
        max_length=args.max_length,
        seed=args.seed,
        backend=args.backend,
        device=device,
        progress=not args.quiet,
        batch_size=args.batch_size,
        merge=args.merge,
        r2_points=args.r2_points,
        d2_mode=args.d2_mode,
        scale_lambda=args.scale_lambda,
        scale_samples=args.scale_samples,
        scale_retries=args.scale_retries,
        min_keep=int(args.min_keep) if args.min_keep >= 1 else args.min_keep,
        precision=args.precision,
        text_column=args.text_column,
        text_pair_column=args.pair_column,
    )
    result.report["source_model"] = args.model
    saved = result.save(out, overwrite=args.overwrite)
    print(result.summary())
    print(f"saved to {saved}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
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
    except KeyboardInterrupt:
        print("kcm-prune: interrupted", file=sys.stderr)
        return 130
    print(f"kcm-prune: error: {msg}", file=sys.stderr)
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
