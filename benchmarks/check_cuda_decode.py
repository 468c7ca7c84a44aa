"""GPU check: decoding through the Triton packed-store kernel gives the same tokens and close
logits as the PyTorch reference, on a small random Llama in bf16 (prints one line per method).

``--chunk``: instead, chunks of new tokens after a compressed prompt (a 64-token question, one decoded
token, a 16-token chunk), growing and fixed decode regions, fp32 and bf16: the chunk kernel must run
(its launch seen by the profiler) and give the PyTorch path's logits; exits 1 otherwise."""

from __future__ import annotations

import argparse
import sys

import torch

import mdkv_compile as mdkv
from mdkv_compile.testing import random_llama

SHAPE = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192)


def main() -> None:
    model = random_llama(**SHAPE).to("cuda", torch.bfloat16)
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


def _chunk_steps(model, cfg: mdkv.MixedDimKVConfig, max_new_tokens: int | None, ids: list[torch.Tensor]):
    """Prompt ids[0], then each of ids[1:] as one forward: (logits of those, store-kernel launches; decode
    and chunks launch the same kernel, once per layer and forward)."""
    from torch.profiler import ProfilerActivity, profile

    mdkv.patch(model, cfg)
    cache = mdkv.MixedDimCache(model.config, cfg, max_new_tokens=max_new_tokens)
    logits = []
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(ids[0], past_key_values=cache, use_cache=True)
        for x in ids[1:]:
            logits.append(model(x, past_key_values=cache, use_cache=True).logits.float())
    launches = sum(e.count for e in prof.key_averages() if "_packed_attention" in e.key)
    return logits, launches


def chunk_check() -> bool:
    gen = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, 1024, (2, n), generator=gen).cuda() for n in (2048, 64, 1, 16)]
    ok = True
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 5e-2)):
        model = random_llama(**SHAPE).to("cuda", dtype)
        for method in ("mixeddimkv", "snapkv"):
            for region in (None, 128):
                runs = {k: _chunk_steps(model, mdkv.MixedDimKVConfig(budget=0.1, method=method, kernel=k), region, ids)
                        for k in ("torch", "auto")}
                (ref, n_ref), (got, n_got) = runs["torch"], runs["auto"]
                err = max(float((a - b).norm() / b.norm()) for a, b in zip(got, ref, strict=True))
                # every forward after the prompt (chunks and the decode step) went through the kernel
                good = err < tol and n_got >= (len(ids) - 1) * SHAPE["num_hidden_layers"] and n_ref == 0
                ok &= good
                print(f"cuda chunk kernel vs torch: {str(dtype):<14} {method:<11} region={region} "
                      f"kernel launches auto={n_got} torch={n_ref} max_rel_logit_err={err:.2e} "
                      f"(tol {tol:.0e}) {'ok' if good else 'FAIL'}", flush=True)
    return ok


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk", action="store_true", help="check chunks after compression instead")
    if parser.parse_args().chunk:
        sys.exit(0 if chunk_check() else 1)
    main()
