"""Greedy generation with ONNX Runtime driving an export of `mdkv.export_onnx`.

Prefill runs in PyTorch (the compression is data-dependent and is not exported): the patched
model (loaded from the manifest's `prefill.model`, or passed in) compresses the prompt, each
layer's packed store is laid out in the export's fixed shapes (`align_store`), and from then on
every token is one run of decode.onnx on ONNX Runtime, the new-token region fed back each step.
The first new token comes from the prefill logits, as in `model.generate`.

The export is checked when it is opened (`read_manifest`: the manifest's and every file's
sha256), so a damaged or edited export fails there, naming the file, not inside ONNX Runtime.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mdkv_compile.assets import check_model_source, load_model
from mdkv_compile.backends.onnx.export import ExportError, align_store, cache_names, read_manifest
from mdkv_compile.cache import MixedDimCache, MixedDimLayer
from mdkv_compile.config import MixedDimKVConfig
from mdkv_compile.hf.patch import patch


@dataclass
class GenerateOutput:
    """What `OnnxGenerator.generate(..., return_dict_in_generate=True)` returns."""

    sequences: torch.Tensor  # [B, N + new] prompt followed by the generated tokens
    logits: list[torch.Tensor]  # per new token [B, V] float32 (the scores it was picked from)
    stored_bytes: int  # the cache tensors the decode graph holds: the prompt store and the new-token region
    full_bytes: int  # a plain cache of every token (prompt and generated)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


class OnnxGenerator:
    """`OnnxGenerator(out_dir).generate(input_ids, max_new_tokens=...)`.

    `model`: the PyTorch model for prefill (default: load the manifest's prefill model).
    `providers`: ONNX Runtime execution providers (default CPU). `inline`: run a copy with the
    mdkv functions inlined (for runtimes without local-function support; ORT inlines by itself)."""

    def __init__(
        self,
        out_dir: str | Path,
        model: torch.nn.Module | None = None,
        providers: list[str] | None = None,
        inline: bool = False,
    ) -> None:
        import onnxruntime as ort

        self.dir = Path(out_dir)
        self.manifest: dict[str, Any] = read_manifest(self.dir)
        m = self.manifest
        try:
            self.cfg = MixedDimKVConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in m["config"].items()})
        except (TypeError, ValueError) as e:
            raise ExportError(f"{self.dir / 'manifest.json'}: its config is not one this mdkv-compile reads ({e}); "
                              "export again") from None
        self.tier_dims = tuple(m["tier_dims"])
        self.value_dims = tuple(m["value_dims"])
        self.num_layers = m["model"]["num_layers"]
        self.has_basis = len(self.tier_dims) > 1
        self.model = model if model is not None else self._load_prefill_model()
        patch(self.model, self.cfg)
        decode = self.dir / m["files"]["decode"]
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if inline:
            import onnx
            import onnx.inliner

            data = onnx.inliner.inline_local_functions(onnx.load(str(decode))).SerializeToString()
            self.session = ort.InferenceSession(data, opts, providers=providers or ["CPUExecutionProvider"])
        else:
            self.session = ort.InferenceSession(str(decode), opts, providers=providers or ["CPUExecutionProvider"])

    def _load_prefill_model(self) -> torch.nn.Module:
        """The manifest's prefill model: the folder the export saved (it must be there: a missing
        one is never looked up on the Hub), a local path, "smollm2", or a Hugging Face name."""
        source = self.manifest["prefill"]["model"]
        dtype = getattr(torch, self.manifest["dtype"])
        saved = self.dir / source
        if saved.is_dir():
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(saved, dtype=dtype).eval()
        if any(name.startswith(f"{source}/") for name in self.manifest["sha256"]):
            raise FileNotFoundError(f"{saved}: the export's prefill model folder is missing; export again")
        check_model_source(source)  # a local path that is gone: say so, not a minute of Hub retries
        # load_model shares one cached object per process; patching it must not leak out.
        return copy.deepcopy(load_model(source, dtype=dtype)[0])

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[np.ndarray]]:
        """PyTorch prefill: last-position logits [B, V] and the export's store tensors, flat."""
        m = self.manifest
        if input_ids.shape[0] != m["batch"]:
            raise ValueError(f"the export was made for batch {m['batch']}, got {input_ids.shape[0]} rows")
        if input_ids.shape[1] > m["max_prompt_tokens"]:
            raise ValueError(f"prompt of {input_ids.shape[1]} tokens; the export allows {m['max_prompt_tokens']}")
        cache = MixedDimCache(self.model.config, self.cfg)
        out = self.model(input_ids=input_ids.to(self.model.device), past_key_values=cache, use_cache=True)
        stores = []
        for layer in cache.layers:
            if not isinstance(layer, MixedDimLayer) or layer.store is None:
                raise RuntimeError("prefill left a layer uncompressed; the export expects every layer compressed")
            static = align_store(layer.store, self.tier_dims, m["capacity"], self.value_dims)
            stores.append([_np(t) for t in static.tensors()])
        return out.logits[:, -1].float().cpu(), stores

    def generate(
        self, input_ids: torch.Tensor, max_new_tokens: int = 32, return_dict_in_generate: bool = False
    ) -> torch.Tensor | GenerateOutput:
        """Greedy decoding of `max_new_tokens` tokens (no EOS stop, like generate with
        min_new_tokens=max_new_tokens). Returns the token ids [B, N + max_new_tokens] (LongTensor,
        the prompt first), as transformers' generate() does; with `return_dict_in_generate`, a
        `GenerateOutput` with them, the logits of every step and the cache's bytes."""
        m = self.manifest
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be a positive int")
        if max_new_tokens - 1 > m["new_capacity"]:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} needs {max_new_tokens - 1} new-token slots; "
                f"the export holds {m['new_capacity']} (re-export with a larger max_new_tokens)"
            )
        input_ids = input_ids.long()
        bsz, n_prompt = input_ids.shape
        logits, stores = self.prefill(input_ids)
        steps = [logits]
        token = logits.argmax(-1)
        generated = [token]
        n_kv, d, cap = m["model"]["kv_heads"], m["model"]["head_dim"], m["new_capacity"]
        dtype = _np(torch.zeros((), dtype=getattr(torch, m["dtype"]))).dtype
        feeds: dict[str, np.ndarray] = {}
        in_names, _ = cache_names(self.num_layers, self.has_basis)
        per = len(in_names) // self.num_layers
        for i, tensors in enumerate(stores):
            names = in_names[i * per : (i + 1) * per]
            for name, arr in zip(names, tensors, strict=False):
                feeds[name] = arr
            feeds[f"new.{i}.keys"] = np.zeros((bsz, n_kv, cap, d), dtype=dtype)
            feeds[f"new.{i}.values"] = np.zeros((bsz, n_kv, cap, d), dtype=dtype)
        stored_bytes = sum(feeds[name].nbytes for name in in_names)
        n_new = np.array(0, dtype=np.int64)
        out_names = [o.name for o in self.session.get_outputs()]
        for _ in range(max_new_tokens - 1):
            feeds["input_ids"] = _np(token[:, None])
            feeds["position_ids"] = np.full((bsz, 1), n_prompt + int(n_new), dtype=np.int64)
            feeds["n_new"] = n_new
            results = dict(zip(out_names, self.session.run(out_names, feeds), strict=True))
            for i in range(self.num_layers):
                feeds[f"new.{i}.keys"] = results[f"new_out.{i}.keys"]
                feeds[f"new.{i}.values"] = results[f"new_out.{i}.values"]
            n_new = results["n_new_out"]
            logits = torch.from_numpy(results["logits"][:, -1])
            steps.append(logits)
            token = logits.argmax(-1)
            generated.append(token)
        sequences = torch.cat([input_ids.cpu(), torch.stack(generated, 1)], 1)
        if not return_dict_in_generate:
            return sequences
        # the last token is generated, never written to the cache
        full_bytes = 2 * self.num_layers * bsz * n_kv * (sequences.shape[1] - 1) * d * dtype.itemsize
        return GenerateOutput(sequences, steps, stored_bytes, full_bytes)
