"""MixedDimKV under transformers tensor parallelism: each rank compresses the KV heads it owns.

    torchrun --nproc-per-node 2 examples/tp_generate.py                 # tiny random Llama, CPU/gloo
    torchrun --nproc-per-node 2 examples/tp_generate.py --model DIR --method ada-snapkv --budget 0.1

`from_pretrained(..., distributed_config=DistributedConfig(tp_plan="auto"))` shards q/k/v by
heads; `mdkv.patch` then makes `generate()` build a MixedDimCache per rank that holds only that
rank's KV heads (budgets pooled over heads are agreed across ranks, see docs/tensor_parallel.md).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import transformers

import mdkv_compile as mdkv
from mdkv_compile.testing import random_llama


def tiny_llama_dir(tmp: str) -> str:
    """Rank 0 saves a tiny random Llama (8 query / 4 KV heads) in its temporary directory and
    tells the others where (every rank made its own temporary directory)."""
    path = [os.path.join(tmp, "tiny-llama")]
    dist.broadcast_object_list(path, src=0)
    path = path[0]
    if dist.get_rank() == 0:
        random_llama(
            vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=4, head_dim=16, max_position_embeddings=2048,
        ).save_pretrained(path)
    dist.barrier()
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF model directory or hub id (default: a tiny random Llama)")
    parser.add_argument("--method", default="mixeddimkv", choices=mdkv.METHODS)
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--head-scores", help="JSON {'scores': [[Hq floats] x L]} for headkv / mixeddimkv-h")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()

    # gloo on CPU, nccl when each rank has a GPU (transformers picks the device the same way).
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    rank, world = dist.get_rank(), dist.get_world_size()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or tiny_llama_dir(tmp)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, distributed_config=transformers.DistributedConfig(tp_plan="auto")
        ).eval()
        cfg = mdkv.MixedDimKVConfig(
            method=args.method, budget=args.budget, window=args.window, head_scores=args.head_scores
        )
        mdkv.patch(model, cfg)
        cache = mdkv.MixedDimCache(model.config, cfg)
        gen = torch.Generator().manual_seed(1)  # same prompt on every rank: TP replicates inputs
        ids = torch.randint(3, model.config.vocab_size, (1, args.prompt_tokens), generator=gen).to(model.device)
        with torch.no_grad():
            out = model.generate(ids, past_key_values=cache, max_new_tokens=args.new_tokens, do_sample=False)
        kv_heads = cache.layers[0].keys.shape[1]
        stored = torch.tensor([cache.stored_bytes(), cache.full_bytes()], dtype=torch.long)
        all_stored = [torch.zeros_like(stored) for _ in range(world)]
        dist.all_gather(all_stored, stored)
        if rank == 0:
            print(f"{args.method}: {world} ranks, {kv_heads} KV heads per rank")
            print("tokens:", out[0, args.prompt_tokens :].tolist())
            for r, t in enumerate(all_stored):
                print(f"rank {r}: stored {int(t[0])} B of a full {int(t[1])} B ({int(t[0]) / int(t[1]):.1%})")
        dist.barrier()  # rank 0 removes the temporary model only after every rank has loaded it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
