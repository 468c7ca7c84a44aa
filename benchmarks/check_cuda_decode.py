"""GPU check: decoding through the Triton packed-store kernel gives the same tokens and close
logits as the PyTorch reference, on a small random Llama in bf16 (prints one line per method)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mdkv_compile as mdkv


def main() -> None:
    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 1024, (2, 2048), device="cuda")
    for method in ("full", "snapkv", "mixeddimkv", "lowrank"):
        outs = {}
        for kernel in ("torch", "auto"):
            cfg = mdkv.MixedDimKVConfig(budget=1.0 if method == "full" else 0.1, method=method, kernel=kernel)
            mdkv.patch(model, cfg)
            cache = mdkv.MixedDimCache(model.config, cfg)
            with torch.inference_mode():
                out = model.generate(ids, max_new_tokens=16, do_sample=False, past_key_values=cache,
                                     output_logits=True, return_dict_in_generate=True)
            outs[kernel] = out
        same = bool((outs["torch"].sequences == outs["auto"].sequences).all())
        pairs = zip(outs["torch"].logits, outs["auto"].logits, strict=True)
        diff = max(float((a.float() - b.float()).abs().max()) for a, b in pairs)
        scale = max(float(a.float().abs().max()) for a in outs["torch"].logits)
        print(f"cuda decode kernel vs torch: {method:<11} same_tokens={same} max_logit_diff={diff:.4f} "
              f"(logit scale {scale:.2f})")


if __name__ == "__main__":
    main()
