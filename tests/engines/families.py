"""Tiny random-weight models of every decoder family users fine-tune, as transformers 5.19 names them.

Hidden 64, two layers (one of each kind for the hybrids), a 512-token vocabulary (the stories260K tokenizer's), KV head
size 32 (what vLLM's CPU attention takes). Weights are drawn with std 0.2, so greedy choices are decisive: a
difference in batching shows as different tokens, not as a coin flip between near-equal logits.
"""

from __future__ import annotations

from typing import Any

VOCAB = 512
BASE: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
HEAD32 = {"head_dim": 32}
EXPERTS = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64}
DELTA_NET = {"linear_conv_kernel_dim": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
             "linear_num_key_heads": 2, "linear_num_value_heads": 4}
LINEAR_THEN_FULL = ["linear_attention", "full_attention"]
SLIDING_THEN_FULL = ["sliding_attention", "full_attention"]
WINDOW = 16  # smaller than most test prompts

FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {**BASE, **HEAD32},
    "mistral": {**BASE, **HEAD32, "sliding_window": WINDOW},
    "mixtral": {**BASE, **HEAD32, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": WINDOW},
    "qwen2": {**BASE},
    "qwen2_moe": {**BASE, **EXPERTS, "shared_expert_intermediate_size": 64},
    "qwen3": {**BASE, **HEAD32},
    "qwen3_moe": {**BASE, **HEAD32, **EXPERTS},
    "qwen3_5_text": {**BASE, **HEAD32, **DELTA_NET, "layer_types": LINEAR_THEN_FULL},
    "qwen3_5_moe_text": {**BASE, **HEAD32, **DELTA_NET, **EXPERTS, "shared_expert_intermediate_size": 64,
                         "layer_types": LINEAR_THEN_FULL},
    "qwen3_next": {**BASE, **HEAD32, **DELTA_NET, **EXPERTS, "shared_expert_intermediate_size": 64,
                   "layer_types": LINEAR_THEN_FULL},
    "gemma": {**BASE, **HEAD32},
    # vLLM ties these families' output layer to the embedding whatever the config says: so do their tiny models.
    "gemma2": {**BASE, **HEAD32, "sliding_window": WINDOW, "tie_word_embeddings": True},
    "gemma3_text": {**BASE, **HEAD32, "sliding_window": WINDOW, "layer_types": SLIDING_THEN_FULL},
    # Full-attention layers take global_head_dim (512 by default); the per-layer input embedding is shrunk too.
    "gemma4_text": {**BASE, **HEAD32, "global_head_dim": 32, "sliding_window": WINDOW,
                    "layer_types": SLIDING_THEN_FULL, "vocab_size_per_layer_input": VOCAB,
                    "hidden_size_per_layer_input": 16},
    "phi": {**BASE},
    "phi3": {**BASE},
    "olmo2": {**BASE},
    "olmo3": {**BASE, "sliding_window": WINDOW, "layer_types": SLIDING_THEN_FULL},
    "olmo_hybrid": {**BASE, "linear_num_key_heads": 2, "linear_num_value_heads": 2, "linear_key_head_dim": 16,
                    "linear_value_head_dim": 32, "layer_types": LINEAR_THEN_FULL},
    "granite": {**BASE},
    # layer_types defaults to all Mamba; mamba_n_heads x mamba_d_head must be mamba_expand x hidden_size.
    "granitemoehybrid": {**BASE, "layer_types": ["mamba", "attention"], "mamba_n_heads": 4, "mamba_d_head": 32,
                         "mamba_d_state": 16, "mamba_n_groups": 1, "mamba_chunk_size": 16, "num_local_experts": 4,
                         "num_experts_per_tok": 2, "shared_intermediate_size": 64},
    # Cohere scales its logits down (logit_scale 0.0625): at 1 greedy choices are as decisive as elsewhere.
    "cohere": {**BASE, "tie_word_embeddings": True, "logit_scale": 1.0},
    # Cohere 2 (Command R7B) puts a full-attention layer after every three sliding ones; vLLM assumes that pattern.
    "cohere2": {**BASE, "num_hidden_layers": 4, "sliding_window": WINDOW, "layer_types": [*["sliding_attention"] * 3,
                "full_attention"], "tie_word_embeddings": True, "logit_scale": 1.0},
    "starcoder2": {**BASE, "sliding_window": WINDOW},
    "stablelm": {**BASE},
    "gpt2": {"vocab_size": VOCAB, "n_embd": 64, "n_layer": 2, "n_head": 2, "n_positions": 1024, "bos_token_id": 1,
             "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False},
    "gpt_neox": {k: v for k, v in BASE.items() if k != "num_key_value_heads"},
    "falcon": {"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
               "max_position_embeddings": 1024, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    # Every layer runs attention and Mamba-2 side by side; mamba_d_ssm = mamba_n_heads x mamba_d_head.
    "falcon_h1": {**BASE, **HEAD32, "mamba_d_ssm": 128, "mamba_n_heads": 4, "mamba_d_head": 32,
                  "mamba_d_state": 16, "mamba_n_groups": 1, "mamba_chunk_size": 16},
    # MLA: batched runs need as many key/value heads as attention heads.
    "deepseek_v3": {**BASE, "num_key_value_heads": 2, "q_lora_rank": None, "kv_lora_rank": 32,
                    "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 32, "n_routed_experts": 4,
                    "num_experts_per_tok": 2, "moe_intermediate_size": 64, "n_group": 1, "topk_group": 1,
                    "first_k_dense_replace": 1, "num_nextn_predict_layers": 0},
    "deepseek_v4": {"vocab_size": VOCAB, "hidden_size": 64, "moe_intermediate_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "q_lora_rank": 32,
                    "num_experts_per_tok": 2, "n_routed_experts": 4, "n_shared_experts": 1,
                    "max_position_embeddings": 1024,
                    "layer_types": ["compressed_sparse_attention", "heavily_compressed_attention"],
                    "compress_rates": {"compressed_sparse_attention": 2, "heavily_compressed_attention": 4},
                    "mlp_layer_types": ["hash_moe", "moe"], "hc_mult": 2, "hc_sinkhorn_iters": 3,
                    "sliding_window": 8, "o_groups": 2, "o_lora_rank": 32, "index_n_heads": 2,
                    "index_head_dim": 16, "index_topk": 4, "num_nextn_predict_layers": 0, "pad_token_id": 0,
                    "bos_token_id": 1, "eos_token_id": 2, "partial_rotary_factor": 0.5,
                    "tie_word_embeddings": False},
    "glm4": {**BASE, **HEAD32},  # head_dim defaults to 128
    "glm4_moe": {**BASE, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                 "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "num_nextn_predict_layers": 0},
    "gpt_oss": {**BASE, **HEAD32, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": WINDOW,
                "layer_types": SLIDING_THEN_FULL},
    "smollm3": {**BASE},
    "exaone4": {**BASE, "sliding_window": WINDOW, "layer_types": SLIDING_THEN_FULL},
    # full_attn_idxs picks the attention layers (by default all of them); the others are short convolutions.
    "lfm2": {**BASE, "full_attn_idxs": [1], "conv_L_cache": 3, "block_auto_adjust_ff_dim": False},
    "jamba": {**BASE, "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2,
              "expert_layer_offset": 1, "num_experts": 4, "num_experts_per_tok": 2, "mamba_d_state": 8,
              "mamba_dt_rank": 8, "use_mamba_kernels": False},
    # layer_types sets the layer count (num_hidden_layers is ignored).
    "nemotron_h": {**BASE, **HEAD32, "layer_types": LINEAR_THEN_FULL, "mamba_num_heads": 4, "mamba_head_dim": 32,
                   "ssm_state_size": 16, "n_groups": 1, "chunk_size": 16, "use_mamba_kernels": False},
    "minimax_m2": {**BASE, **HEAD32, "num_local_experts": 4, "num_experts_per_tok": 2},
    "ernie4_5": {**BASE, **HEAD32},
    "hunyuan_v1_dense": {**BASE, **HEAD32},
    # Chunked attention on three layers of four; four layers give it the NoPE full-attention layer too.
    "llama4_text": {**BASE, **HEAD32, "num_hidden_layers": 4, "intermediate_size": 64, "intermediate_size_mlp": 128,
                    "num_local_experts": 2, "num_experts_per_tok": 1, "attention_chunk_size": WINDOW},
    # Kimi Delta Attention and MLA; head_dim follows qk_rope_head_dim.
    "kimi_linear": {**BASE, "num_key_value_heads": 2, "layer_types": LINEAR_THEN_FULL,
                    "mlp_layer_types": ["dense", "sparse"], "linear_head_dim": 32, "linear_num_heads": 2,
                    "linear_conv_kernel_dim": 4, "kv_lora_rank": 32, "q_lora_rank": None, "qk_rope_head_dim": 16,
                    "qk_nope_head_dim": 16, "v_head_dim": 32, "num_experts": 4, "num_experts_per_token": 2,
                    "moe_intermediate_size": 64, "num_shared_experts": 1},
}


def build(family: str, seed: int = 0, **overrides: Any) -> Any:
    """The family's tiny model, float32, eval mode, with no end-of-sequence token (every run makes all its tokens)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, **{**FAMILIES[family], **overrides}, initializer_range=0.2)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def prompts(count: int = 12, *, low: int = 5, high: int = 60, seed: int = 0) -> list[list[int]]:
    """``count`` prompts of ``low``..``high`` token ids (no special ids), the same every run."""
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(low, high))] for _ in range(count)]
