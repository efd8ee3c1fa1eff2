"""Small GGUF files written here with the gguf package's own writer (no download): a random transformers
checkpoint (hf_checkpoints.build) renamed to llama.cpp's tensor names, its matrices quantized to Q8_0
(so that loading dequantizes), with the BPE tokenizer of hf_checkpoints in the file's metadata."""
import json
from pathlib import Path

import numpy as np

from data.tokenizer import END_OF_DOCUMENT
from hf_checkpoints import build

LLAMA_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def permute(w, heads):
    """llama.cpp's order of q and k rows (rotary pairs interleaved); transformers undoes it on load."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def add_tokenizer(writer, tokenizer_path, bos_first=False, bos_name=END_OF_DOCUMENT):
    spec = json.loads(Path(tokenizer_path).read_text())
    vocab = {**spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec["added_tokens"]}}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]
    specials = {t["content"] for t in spec["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in specials else 1 for t in tokens])  # 3: control
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab[bos_name])
    writer.add_eos_token_id(vocab[END_OF_DOCUMENT])
    writer.add_add_bos_token(bos_first)


GEMMA3_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
                "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "post_attention_norm",
                "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
                "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
# A Gemma 3 file states no layer pattern, local RoPE base or query scale: readers take Gemma 3's (every
# sixth block global, 10k, 256), so the checkpoint is built with them; heads of 16 on a 32-wide stream,
# local blocks of 8 tokens.
GEMMA3_SHAPE = dict(num_hidden_layers=6, head_dim=16, query_pre_attn_scalar=256, sliding_window=8, layer_types=None,
                    rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 500.0},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})


def write_llama_gguf(path, tokenizer_path, **kwargs):
    """A Llama-shaped GGUF file (grouped-query attention, tied head) at path."""
    return write_gguf(path, tokenizer_path, "llama", **kwargs)


def write_gemma3_gguf(path, tokenizer_path, **kwargs):
    """A Gemma 3-shaped GGUF file (sandwich norms, QK-norm, local blocks, head size unlike width / heads)."""
    return write_gguf(path, tokenizer_path, "gemma3", **kwargs)


def write_gguf(path, tokenizer_path, family, quantize=True, seed=0, bos_first=False, bos_name=END_OF_DOCUMENT):
    """A random `family` checkpoint as a GGUF file at path; returns path. bos_first: its tokenizer puts
    bos_name before every text, as Gemma's does."""
    import gguf
    import torch
    values = dict(tie_word_embeddings=True, **(GEMMA3_SHAPE if family == "gemma3" else {}))
    folder = build(family, Path(path).parent / f"{Path(path).stem}-source", tokenizer_path, seed=seed, **values)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder)
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    writer = gguf.GGUFWriter(str(path), family)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["full_attention"]["rope_theta"] if family == "gemma3"
                              else c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    if family == "gemma3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_sliding_window(c.sliding_window)
    else:
        writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quantize else gguf.LlamaFileType.ALL_F32)
    add_tokenizer(writer, tokenizer_path, bos_first, bos_name)
    layer = GEMMA3_LAYER if family == "gemma3" else LLAMA_LAYER
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    for i in range(c.num_hidden_layers):
        names.update({f"model.layers.{i}.{theirs}.weight": f"blk.{i}.{ours}.weight" for theirs, ours in layer.items()})
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key == "lm_head.weight":
                continue  # tied: the embedding
            w = value.float().numpy()
            if family == "llama" and key.endswith("q_proj.weight"):
                w = permute(w, c.num_attention_heads)
            elif family == "llama" and key.endswith("k_proj.weight"):
                w = permute(w, c.num_key_value_heads)
            elif family == "gemma3" and "norm" in key:
                w = w + 1  # llama.cpp stores Gemma's gains as 1 + w; readers subtract the 1
            if quantize and w.ndim == 2:
                q = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
                writer.add_tensor(names[key], q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            else:
                writer.add_tensor(names[key], np.ascontiguousarray(w, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
