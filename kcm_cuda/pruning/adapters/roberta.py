"""RoBERTa (RobertaModel and every RobertaFor* head): same block layout as BERT."""

from kcm_cuda.pruning.adapters.base import FFNAdapter

ROBERTA = FFNAdapter(
    name="RoBERTa",
    base_classes=("RobertaModel",),
    layers_path=("encoder", "layer"),
    w1_path=("intermediate", "dense"),
    w2_path=("output", "dense"),
    hidden_field="hidden_size",
    intermediate_field="intermediate_size",
    heads_field="num_attention_heads",
)
