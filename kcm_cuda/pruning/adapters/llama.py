"""The LLaMA family of decoder-only LMs (LlamaModel / MistralModel / Qwen2Model and their
*ForCausalLM and other heads): model.layers[i].mlp.{gate,up,down}_proj (a gated SiLU MLP,
down(act(gate(x)) ⊙ up(x))), self_attn.{q,k,v,o}_proj with grouped-query attention
(``num_key_value_heads`` ≤ ``num_attention_heads``), RMSNorm, no MLP biases.

LLaMA's class reads ``mlp_bias`` (a bias on all three MLP linears), so a refitted down_proj
bias saves as a plain LLaMA checkpoint; Mistral's and Qwen2's MLPs are built without biases,
so their refit fits the weights alone (kcm_cuda.pruning.layout.refit_bias); a bias forced on
them is recorded as ``kcm_mlp_bias`` and restored by ``load_pruned``.
"""

from kcm_cuda.pruning.adapters.base import FFNAdapter


def _family(name: str, base: str, mlp_bias_field: str | None) -> FFNAdapter:
    return FFNAdapter(
        name=name,
        base_classes=(base,),
        layers_path=("layers",),
        w1_path=("mlp", "gate_proj"),
        w2_path=("mlp", "down_proj"),
        hidden_field="hidden_size",
        intermediate_field="intermediate_size",
        heads_field="num_attention_heads",
        attn_path=("self_attn",),
        q_path=("self_attn", "q_proj"),
        k_path=("self_attn", "k_proj"),
        v_path=("self_attn", "v_proj"),
        o_path=("self_attn", "o_proj"),
        causal=True,
        ffn_in_paths=(("mlp", "up_proj"),),
        kv_heads_field="num_key_value_heads",
        head_dim_field="head_dim",
        mlp_bias_field=mlp_bias_field,
        kv_groups_attr="num_key_value_groups",
    )


LLAMA = _family("LLaMA", "LlamaModel", "mlp_bias")
MISTRAL = _family("Mistral", "MistralModel", None)
QWEN2 = _family("Qwen2", "Qwen2Model", None)
