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
    attn_path=("attention", "self"),
    q_path=("attention", "self", "query"),
    k_path=("attention", "self", "key"),
    v_path=("attention", "self", "value"),
    o_path=("attention", "output", "dense"),
    heads_attrs=("num_attention_heads",),
    all_head_size_attrs=("all_head_size",),
    positions_after_padding=True,  # roberta-base: 514 positions, 512 tokens
)
