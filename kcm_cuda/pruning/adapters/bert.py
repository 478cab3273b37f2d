"""BERT (BertModel and every BertFor* head): encoder.layer[i].intermediate.dense /
output.dense."""

from kcm_cuda.pruning.adapters.base import FFNAdapter

BERT = FFNAdapter(
    name="BERT",
    base_classes=("BertModel",),
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
)
