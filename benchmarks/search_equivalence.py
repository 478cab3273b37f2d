"""The streamed search against the in-memory one it replaced: run the structure search of
whichever kcm_cuda is first on the path (the code of before: ``PYTHONPATH=<old checkout>``)
and print each candidate's criterion as JSON, so that two runs can be compared.

    PYTHONPATH=/tmp/old python -m benchmarks.search_equivalence clf DIR 0.6 old > old.json
    python -m benchmarks.search_equivalence clf DIR 0.6 new > new.json

``clf DIR``: a fine-tuned classifier (vader-amazon's pool as data); ``lm DIR``: a causal LM
(600 random 64-token rows). "new" runs the held-out mode (search_folds=0, no tie rule,
search_rows=128, scale_samples=256): the same rows, options and choice rule as the old
default, so every criterion must agree. Results: benchmarks/results/<device>/
search_streamed_equivalence/.
"""

from __future__ import annotations

import json
import sys

import torch


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    import kcm_cuda
    from kcm_cuda.pruning import prune

    kind, path, c, mode = argv[0], argv[1], float(argv[2]), argv[3]
    print("kcm_cuda from", kcm_cuda.__file__, file=sys.stderr)
    if kind == "clf":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from kcm_cuda.evaluation.datasets import get_task

        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        data = list(get_task("vader-amazon").pool)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path).eval()
        tok = None
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, model.config.vocab_size, (600, 64), generator=g)
        data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    kw = dict(tokenizer=tok, progress=False, samples=384)
    if mode == "new":
        kw["experimental"] = {"search_folds": 0, "search_tie_se": 0.0, "search_rows": 128}
        kw["scale_samples"] = 256
    r = prune(model, data, c, **kw)
    s = r.report["structure"]
    crit = [
        (x["structure"], x.get("criterion"), x.get("criterion_sequential_refit"))
        for x in s["candidates"]
    ]
    out = {"chosen": s["chosen"], "crit": crit, "chosen_criterion": s["chosen_criterion"]}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
