"""What the structure search holds for one layer (whatever the depth) on real LLM shapes, and
whether it runs on this machine now. The models are built on the meta device: nothing is
allocated, so this takes a second.

    python -m benchmarks.search_layer_memory
"""

from __future__ import annotations

import torch

EXTRA = {
    "llama-3.2-1b": dict(family="llama", num_hidden_layers=16, hidden_size=2048,
                         intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8),
    "llama-3.1-8b": dict(family="llama", num_hidden_layers=32, hidden_size=4096,
                         intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
    "llama-3.1-70b": dict(family="llama", num_hidden_layers=80, hidden_size=8192,
                          intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8),
}  # fmt: skip


def main() -> int:
    import transformers

    from benchmarks.search_at_scale import SHAPES
    from kcm_cuda.pruning.adapters import get_adapter
    from kcm_cuda.pruning.structure import available_memory, layer_bytes, search_does_not_fit

    print(f"free memory now: {available_memory() / 2**30:.1f} GiB")
    axes = {"heads": (False, True)}
    for name, shape in {**SHAPES, **EXTRA}.items():
        cfg = dict(shape)
        family = cfg.pop("family")
        cfg["vocab_size"] = 1000
        cls = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig}[family]
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(cls(**cfg))
        ad = get_adapter(model)
        why = search_does_not_fit(ad, model, axes, torch.device("cpu"), 4)
        print(
            f"{name}: {layer_bytes(ad, model, True, 4) / 2**30:.2f} GiB for one layer "
            f"({cfg['num_hidden_layers']} layers); here: {why or 'the search runs'}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
