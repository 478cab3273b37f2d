"""DistilBERT (DistilBertModel and every DistilBertFor* head): transformer.layer[i].ffn.lin1 /
ffn.lin2."""

from kcm_cuda.pruning.adapters.base import FFNAdapter

DISTILBERT = FFNAdapter(
    name="DistilBERT",
    base_classes=("DistilBertModel",),
    layers_path=("transformer", "layer"),
    w1_path=("ffn", "lin1"),
    w2_path=("ffn", "lin2"),
    hidden_field="dim",
    intermediate_field="hidden_dim",
    heads_field="n_heads",
    attn_path=("attention",),
    q_path=("attention", "q_lin"),
    k_path=("attention", "k_lin"),
    v_path=("attention", "v_lin"),
    o_path=("attention", "out_lin"),
    heads_attrs=("n_heads",),
)
