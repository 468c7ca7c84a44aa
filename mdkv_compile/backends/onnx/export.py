"""ONNX export of the decode step of a Hugging Face decoder compressed with MixedDimKV.

What is exported: one decode step (one new token per row) as a fixed-shape graph

    inputs   input_ids [B, 1] int64, position_ids [B, 1] int64, n_new [] int64,
             per layer l: store.{l}.keys/values [B*H, capacity], store.{l}.counts [B*H, T] int32,
             (store.{l}.basis_k [B*H, d, rk_max], store.{l}.basis_v [B*H, d, rv_max] when the method
             stores reduced tiers),
             new.{l}.keys/values [B, H, new_capacity, d]
    outputs  logits [B, 1, V], n_new_out [] int64 (= n_new + 1),
             new_out.{l}.keys/values [B, H, new_capacity, d] (the region with this token written)

The prompt store is read-only during decoding, so it is only an input (a runtime binds the same
buffers every step); the new-token region goes in and comes out (a runtime can alias the two).
Prefill stays in PyTorch: the compression is data-dependent (per-token tier choice, sorting,
per-owner counts), so `OnnxGenerator` runs the patched model's prefill and hands each layer's
packed store over as the static layout of `mdkv_compile.core.static`.

Each layer's attention over store + region is one node `mdkv::MixedDimKVAttention` (an ONNX
OpSchema is registered so the exporter keeps it) with attributes `plugin_namespace`,
`plugin_version` (TensorRT's parser maps the node to our plugin by them), and the model carries a
local FunctionProto of the same (domain, name) computing `attend_static` in standard ops, so stock
ONNX Runtime runs the file as it is (it inlines the function).

Files written to `out_dir`: decode.onnx, prefill_model/ (HF weights for the PyTorch prefill,
unless `prefill_source` names where to load them from) and, last, manifest.json, which records the
sha256 of every other file and of its own content (the runtime checks both) and marks the folder
as an export. They are written into a new sibling folder and renamed into place, so a
half-written export never looks complete. An export only ever replaces an earlier export (a
folder whose manifest lists everything in it), never the current folder or one above it, and
removes only the files the earlier export's manifest lists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import math
import shutil
import sys
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

import torch

from mdkv_compile.assets import sha256_file
from mdkv_compile.cache import model_dims
from mdkv_compile.config import MixedDimKVConfig
from mdkv_compile.core.packing import PackedStore
from mdkv_compile.core.static import StaticStore, attend_static, to_static
from mdkv_compile.hf.patch import check_supported, patched_config
from mdkv_compile.methods import RECORDS

DOMAIN = "mdkv"
OP_NAME = "MixedDimKVAttention"
OP_VERSION = 1
PLUGIN_NAMESPACE = "mdkv"
PLUGIN_VERSION = "1"
OPSET = 20
EXPORT_ATTN = "mdkv_export"
FORMAT = "mdkv-onnx-decode"
# 2: the manifest holds the sha256 of every file and of itself, and the config's min_compress_tokens.
# 3: the node and the manifest carry value_dims beside tier_dims (a tier's keys and values may keep
# different dims).
FORMAT_VERSION = 3
MANIFEST = "manifest.json"


class ExportError(ValueError):
    """The model or config cannot be exported (raised before any file is written)."""


# --------------------------------------------------------------------------------------------
# Functional custom op: what the exporter sees for each layer's attention.


@torch.library.custom_op("mdkv_export::attention", mutates_args=())
def _attention_op(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    counts: torch.Tensor,
    key_new: torch.Tensor,
    value_new: torch.Tensor,
    n_new: torch.Tensor,
    basis_k: torch.Tensor | None,
    basis_v: torch.Tensor | None,
    tier_dims: list[int],
    value_dims: list[int],
    kv_heads: int,
    scale: float,
    softcap: float,
) -> torch.Tensor:
    store = StaticStore(
        tuple(tier_dims), keys, values, counts, basis_k, basis_v, query.shape[0], kv_heads, query.shape[-1],
        tuple(value_dims),
    )
    return attend_static(query, store, key_new, value_new, n_new, scale, softcap or None)


@_attention_op.register_fake
def _(query, keys, values, counts, key_new, value_new, n_new, basis_k, basis_v, tier_dims, value_dims, kv_heads, scale,
      softcap):
    return torch.empty_like(query)


def _register_schema() -> None:
    """The ONNX OpSchema of the opaque node: onnxscript refuses to emit an op without one."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has(OP_NAME, DOMAIN):
        return
    param = OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    attr = OpSchema.Attribute
    types = OpSchema.AttrType
    schema = OpSchema(
        OP_NAME, DOMAIN, OP_VERSION,
        doc="Attention of new-token queries over a MixedDimKV static store plus a full-dimension region.",
        inputs=[
            param("query", "T"), param("keys", "T"), param("values", "T"), param("counts", "I"),
            param("key_new", "T"), param("value_new", "T"), param("n_new", "L"),
            param("basis_k", "T", param_option=optional), param("basis_v", "T", param_option=optional),
        ],
        outputs=[param("out", "T")],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations and cache"),
            ("I", ["tensor(int32)"], "tokens per tier"),
            ("L", ["tensor(int64)"], "new tokens held"),
        ],
        attributes=[
            attr("tier_dims", types.INTS, "stored key dims per tier, full tier first"),
            attr("value_dims", types.INTS, "stored value dims per tier, full tier first"),
            attr("kv_heads", types.INT, "key/value heads"),
            attr("scale", types.FLOAT, "logit scale"),
            attr("softcap", types.FLOAT, "logit soft cap (0: none)"),
            attr("plugin_namespace", types.STRING, "TensorRT plugin namespace"),
            attr("plugin_version", types.STRING, "TensorRT plugin version"),
        ],
    )
    onnx.defs.register_schema(schema)


def _translation():
    """onnxscript translation of the custom op into the opaque `mdkv` node."""
    import onnxscript

    _register_schema()
    opset = onnxscript.values.Opset(DOMAIN, OP_VERSION)

    def mdkv_attention(
        query, keys, values, counts, key_new, value_new, n_new, basis_k=None, basis_v=None,
        tier_dims=(), value_dims=(), kv_heads: int = 1, scale: float = 1.0, softcap: float = 0.0,
    ):
        inputs = [query, keys, values, counts, key_new, value_new, n_new]
        if basis_k is not None:
            inputs += [basis_k, basis_v]
        return opset.MixedDimKVAttention(
            *inputs, tier_dims=list(tier_dims), value_dims=list(value_dims), kv_heads=kv_heads, scale=float(scale),
            softcap=float(softcap), plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION,
        )

    return {torch.ops.mdkv_export.attention.default: mdkv_attention}


# --------------------------------------------------------------------------------------------
# The traced decode step: a transformers Cache whose layers hold the static store as tensors.

_TRACE = threading.local()


def _export_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kw):
    """Attention-interface function used while tracing: the layer's static store + region."""
    layer = _TRACE.layers[module.layer_idx]
    s = layer.store
    out = torch.ops.mdkv_export.attention(
        query, s.keys, s.values, s.counts, layer.key_new, layer.value_new, layer.n_new,
        s.basis_k, s.basis_v, list(s.tier_dims), list(s.value_dims), s.kv_heads,
        float(scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])), float(softcap or 0.0),
    )
    return out.transpose(1, 2).contiguous(), None


def _make_cache(stores: list[StaticStore], regions: list[tuple[torch.Tensor, torch.Tensor]], n_new: torch.Tensor):
    from transformers.cache_utils import Cache, CacheLayerMixin

    class _StaticLayer(CacheLayerMixin):
        is_compileable = False
        is_sliding = False

        def __init__(self, store: StaticStore, key_new: torch.Tensor, value_new: torch.Tensor) -> None:
            super().__init__()
            self.store, self.key_new, self.value_new, self.n_new = store, key_new, value_new, n_new
            self.is_initialized = True

        def lazy_initialization(self, key_states, value_states) -> None:
            pass

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            # Functional write of the one new token at slot n_new (a where, not index_copy: it
            # exports to plain Equal/Where).
            cap = self.key_new.shape[2]
            at = (torch.arange(cap, device=key_states.device) == n_new)[None, None, :, None]
            self.key_new = torch.where(at, key_states.to(self.key_new.dtype), self.key_new)
            self.value_new = torch.where(at, value_states.to(self.value_new.dtype), self.value_new)
            self.n_new = n_new + 1
            return self.key_new, self.value_new

        def get_seq_length(self) -> int:
            return 0

        def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
            return query_length, 0

        def get_max_length(self) -> int:
            return -1

    class _StaticCache(Cache):
        def __init__(self) -> None:
            super().__init__(layers=[_StaticLayer(s, k, v) for s, (k, v) in zip(stores, regions, strict=True)])

    return _StaticCache()


class DecodeStep(torch.nn.Module):
    """One decode step of `model` over flat fixed-shape cache tensors (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, tiers: tuple[tuple[int, int], ...]) -> None:
        super().__init__()
        self.model = model
        self.num_layers, _, self.kv_heads, self.head_dim = model_dims(model.config)
        self.tier_dims, self.value_dims = _split(tiers)
        self.has_basis = len(tiers) > 1

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, n_new: torch.Tensor, *cache: torch.Tensor):
        per = 7 if self.has_basis else 5
        stores, regions = [], []
        for i in range(self.num_layers):
            t = cache[i * per : (i + 1) * per]
            stores.append(StaticStore.from_tensors(
                list(t[: per - 2]), self.tier_dims, input_ids.shape[0], self.kv_heads, self.head_dim, self.value_dims
            ))
            regions.append((t[per - 2], t[per - 1]))
        cache_obj = _make_cache(stores, regions, n_new)
        _TRACE.layers = cache_obj.layers
        out = self.model(input_ids=input_ids, position_ids=position_ids, past_key_values=cache_obj, use_cache=True)
        new = [x for layer in cache_obj.layers for x in (layer.key_new, layer.value_new)]
        return (out.logits.float(), n_new + 1, *new)


# --------------------------------------------------------------------------------------------
# Layout shared by export and runtime.


def export_tiers(cfg: MixedDimKVConfig, head_dim: int) -> tuple[tuple[int, int], ...]:
    """Every tier a prompt's store can have, as (key dims, value dims): the full tier, then the
    config's reduced tiers in the policy's order, descending (eviction methods store only the full
    tier, so their exports carry no basis inputs)."""
    full = ((head_dim, head_dim),)
    if not RECORDS[cfg.method].stores_reduced_tiers:
        return full
    return full + tuple(sorted(cfg.resolve_tiers(head_dim), reverse=True))


def _split(tiers: tuple[tuple[int, int], ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(tier_dims, value_dims) of (key dims, value dims) pairs."""
    return tuple(rk for rk, _ in tiers), tuple(rv for _, rv in tiers)


def _basis_widths(tiers: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """(rk_max, rv_max): the export's basis columns, the widest reduced key and value."""
    return max(rk for rk, _ in tiers[1:]), max(rv for _, rv in tiers[1:])


def align_store(
    store: PackedStore, tier_dims: tuple[int, ...], capacity: int, value_dims: tuple[int, ...] | None = None
) -> StaticStore:
    """A prompt's packed store in the export's fixed layout: tier t of the export keeps
    (tier_dims[t], value_dims[t]) dims (value_dims None: the same as tier_dims); the store's tiers (a
    subset) go to theirs, the others are empty (count 0), bases zero-padded to the export's rk_max
    and rv_max."""
    tiers = tuple(zip(tier_dims, tier_dims if value_dims is None else value_dims, strict=True))
    missing = set(store.tiers) - set(tiers)
    if missing:
        raise ValueError(f"store has tiers {sorted(missing)} (key dims, value dims) the export does not know "
                         f"(export tiers {tiers})")
    try:
        st = to_static(_with_tiers(store, tiers), capacity)
    except ValueError as e:
        raise ValueError(f"{e}: the prompt needs a larger export (raise --capacity or shorten the prompt)") from e
    if len(tiers) == 1:
        return dataclasses.replace(st, basis_k=None, basis_v=None)
    basis_k, basis_v = (_padded_basis(b, store.owners, store.head_dim, r, st.keys)
                        for b, r in zip((st.basis_k, st.basis_v), _basis_widths(tiers), strict=True))
    return dataclasses.replace(st, basis_k=basis_k, basis_v=basis_v)


def _with_tiers(store: PackedStore, tiers: tuple[tuple[int, int], ...]) -> PackedStore:
    """The store with exactly `tiers`, in that order (tiers it lacks empty): `to_static` lays rows out
    tier after tier, so the export's order decides where each tier starts."""
    index = {pair: t for t, pair in enumerate(store.tiers)}
    ref = store.keys[0]
    keys, values, offsets = [], [], []
    for rk, rv in tiers:
        t = index.get((rk, rv))
        keys.append(ref.new_empty(0, rk) if t is None else store.keys[t])
        values.append(store.values[0].new_empty(0, rv) if t is None else store.values[t])
        offsets.append(None if t is None else store.offsets[t])
    return dataclasses.replace(store, tier_dims=_split(tiers)[0], value_dims=_split(tiers)[1], keys=keys,
                               values=values, offsets=offsets)


def _padded_basis(basis: torch.Tensor | None, owners: int, d: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """[owners, d, width]: the basis's first columns, zeros past them (and everywhere without one)."""
    out = torch.zeros(owners, d, width, dtype=like.dtype, device=like.device)
    if basis is not None:
        r = min(width, basis.shape[-1])
        out[..., :r] = basis[..., :r]
    return out


def cache_names(num_layers: int, has_basis: bool) -> tuple[list[str], list[str]]:
    """(input names, output names) of the cache tensors, in graph order."""
    ins, outs = [], []
    for i in range(num_layers):
        ins += [f"store.{i}.keys", f"store.{i}.values", f"store.{i}.counts"]
        if has_basis:
            ins += [f"store.{i}.basis_k", f"store.{i}.basis_v"]
        ins += [f"new.{i}.keys", f"new.{i}.values"]
        outs += [f"new_out.{i}.keys", f"new_out.{i}.values"]
    return ins, outs


def default_capacity(cfg: MixedDimKVConfig, head_dim: int, max_prompt_tokens: int, slack: float = 2.0) -> int:
    """Elements per (row, KV head) owner in each of the key and the value buffer: `slack` x the
    budget's average share of a max-length prompt (head-aware methods give some heads more than the
    average), and at least what a prompt the config keeps whole needs (the window and sinks, a prompt
    of `min_compress_tokens`); at most the full prompt. A buffer's share of the budget is its side of
    the widest-sided tier (half when every tier keeps keys and values at the same dims; 2/3 with a
    tier of twice as many key dims as value dims, such as the default (d/4, d/8), all of whose
    tokens may be chosen)."""
    full = max_prompt_tokens * head_dim
    if cfg.budget is None or cfg.method == "full":
        return full
    share = max(max(rk, rv) / (rk + rv) for rk, rv in export_tiers(cfg, head_dim))
    kept_whole = max(cfg.window + cfg.sinks, cfg.min_compress_tokens)
    tokens = max(int(math.ceil(slack * 2 * share * cfg.budget * full / head_dim)), kept_whole)
    return min(full, tokens * head_dim)


# --------------------------------------------------------------------------------------------
# Checks before writing anything.


def _check_exportable(model: torch.nn.Module, cfg: MixedDimKVConfig, out_dir: Path, overwrite: bool) -> None:
    try:
        check_supported(model)
    except NotImplementedError as e:
        raise ExportError(f"cannot export: {e}") from e
    text = model.config.get_text_config(decoder=True)
    kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise ExportError(
            f"cannot export {model.config.model_type}: layer types {sorted(kinds)}; the ONNX export covers "
            "decoders whose layers are all full attention (sliding-window layers keep a rolling cache it lacks)"
        )
    method = RECORDS[cfg.method]
    if not method.exportable:
        raise ExportError(f"cannot export method {cfg.method!r}: {method.not_exportable}")
    if cfg.budget is None:
        raise ExportError("cannot export a budget_tokens/budget_bytes config: give budget as a fraction")
    check_out_dir(out_dir, overwrite)


def check_out_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """The export folder as an absolute path, or ExportError when an export may not be written
    there: the current folder or one above it, a file, a folder below a file, a non-empty folder
    that is not an earlier export, an earlier export without `overwrite`, or one holding files
    it did not write. Nothing is changed."""
    out = Path(out_dir).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise ExportError(f"{out_dir} is the current folder or one above it: an export needs a folder of its own "
                          f"(e.g. {Path(out_dir) / 'export'}); nothing was written")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise ExportError(f"{out_dir}: {existing} is a file; give a folder path")
    if existing != out or not any(out.iterdir()):
        return out
    manifest = _earlier_export(out)
    if manifest is None:
        raise ExportError(f"{out_dir} is not empty and is not an mdkv export: an export only replaces an earlier "
                          "export; choose a new or empty folder")
    if not overwrite:
        raise ExportError(f"{out_dir} holds an mdkv export (pass overwrite=True / --overwrite to replace it)")
    written = _written_by(out, manifest)
    foreign = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p not in written)
    if foreign:
        raise ExportError(f"{out_dir} holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}, which the "
                          "export did not write: move them out or choose another folder")
    return out


def is_export(folder: str | Path) -> bool:
    """Whether `folder` holds an mdkv ONNX export (its manifest parses; this checks no hash)."""
    return _earlier_export(Path(folder)) is not None


def _earlier_export(folder: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def _written_by(folder: Path, manifest: dict[str, Any]) -> set[Path]:
    """The files an export wrote into `folder`, by its manifest (format 1 listed no hashes: its
    decode files and saved prefill model)."""
    names = set(manifest.get("sha256", {}))
    if manifest.get("format_version") == 1:
        names |= {*manifest.get("files", {}).values(), "decode.onnx.data"}
        if manifest.get("prefill", {}).get("model") == "prefill_model":
            names |= {str(p.relative_to(folder)) for p in (folder / "prefill_model").rglob("*")}
    return {folder / name for name in names} | {folder / MANIFEST}


def _install(tmp: Path, out: Path) -> None:
    """Move the finished export `tmp` to `out` (new, empty, or an earlier export that
    `check_out_dir` allowed), then remove the earlier export's files, and only those."""
    if not (out.is_dir() and any(out.iterdir())):
        tmp.replace(out)  # rename(2) replaces an empty folder in one step
        return
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:12]}")
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)  # the earlier export stays where it was
        raise
    manifest = _earlier_export(old) or {}
    for path in sorted(_written_by(old, manifest), key=lambda p: len(p.parts), reverse=True):
        if path.is_file():
            path.unlink()
    for folder in sorted((p for p in old.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()
    if any(old.iterdir()):
        print(f"mdkv export: {old} kept: it holds files the earlier export did not write", file=sys.stderr)
    else:
        old.rmdir()


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of a manifest's content (canonical JSON) without its own digest."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Record the sha256 of every file in `folder` and of the manifest's own content, then write
    the manifest (last: its presence marks a complete export)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest["sha256"] = {p.relative_to(folder).as_posix(): sha256_file(p) for p in files}
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))


def read_manifest(folder: str | Path, check_files: bool = True) -> dict[str, Any]:
    """An export's manifest, checked: it parses, is of this format version, its content matches
    its sha256 (an edited budget or capacity would not match decode.onnx) and, with
    `check_files`, so does every file it lists. ExportError (FileNotFoundError for a missing file)
    naming the file otherwise."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {folder} is not a complete mdkv ONNX export")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise ExportError(f"{path} is damaged (not valid JSON: {e}); export again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{path} is damaged or not an mdkv export manifest (no format {FORMAT!r}); export again")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{path}: export format version {manifest.get('format_version')!r}; this mdkv-compile reads "
                          f"version {FORMAT_VERSION}: export again")
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise ExportError(f"{path} was edited or damaged: its content does not match its sha256 (the budget, "
                          "capacity and shapes must stay those of decode.onnx); export again")
    if check_files:
        for name, digest in manifest["sha256"].items():
            file = folder / name
            if not file.is_file():
                raise FileNotFoundError(f"{file} is missing from the export; export again")
            if sha256_file(file) != digest:
                raise ExportError(f"{file} is damaged: its sha256 does not match the manifest's; export again")
    return manifest


def add_to_export(folder: str | Path, key: str, path: str | Path) -> None:
    """Record a file written into an export afterwards (the TensorRT engine) as `files[key]` in its
    manifest, hashed like the others, so that a later export may replace it."""
    folder = Path(folder)
    manifest = read_manifest(folder, check_files=False)
    manifest["files"][key] = Path(path).resolve().relative_to(folder.resolve()).as_posix()
    write_manifest(folder, manifest)


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("mdkv-compile", "torch", "transformers", "onnx", "onnxscript", "onnxruntime"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


# --------------------------------------------------------------------------------------------
# The fallback function: attend_static exported on its own, turned into a FunctionProto.


class _AttendStatic(torch.nn.Module):
    def __init__(
        self, tier_dims: tuple[int, ...], value_dims: tuple[int, ...], kv_heads: int, scale: float, softcap: float
    ) -> None:
        super().__init__()
        self.tier_dims, self.value_dims = tier_dims, value_dims
        self.kv_heads, self.scale, self.softcap = kv_heads, scale, softcap

    def forward(self, query, keys, values, counts, key_new, value_new, n_new, *basis):
        b = list(basis) or [None, None]
        store = StaticStore(
            self.tier_dims, keys, values, counts, b[0], b[1], query.shape[0], self.kv_heads, query.shape[-1],
            self.value_dims,
        )
        return attend_static(query, store, key_new, value_new, n_new, self.scale, self.softcap or None)


FUNCTION_INPUTS = ["query", "keys", "values", "counts", "key_new", "value_new", "n_new", "basis_k", "basis_v"]


def _function_proto(example: list[torch.Tensor], attrs: dict[str, Any], opset_imports) -> Any:
    """FunctionProto (mdkv, MixedDimKVAttention) in standard ops, traced from `attend_static` at the
    export's shapes (every layer shares them)."""
    import onnx
    import onnx.inliner
    from onnx import helper

    mod = _AttendStatic(
        tuple(attrs["tier_dims"]), tuple(attrs["value_dims"]), attrs["kv_heads"], attrs["scale"], attrs["softcap"]
    ).eval()
    names = FUNCTION_INPUTS[: len(example)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "attn.onnx"
        torch.onnx.export(
            mod, tuple(example), str(path), dynamo=True, opset_version=OPSET, input_names=names,
            output_names=["out"], external_data=False, optimize=True,
        )
        proto = onnx.inliner.inline_local_functions(onnx.load(str(path)))
    g = proto.graph
    nodes = [helper.make_node("Constant", [], [init.name], value=init) for init in g.initializer]
    nodes += list(g.node)
    return helper.make_function(
        DOMAIN, OP_NAME, [i.name for i in g.input], [o.name for o in g.output], nodes,
        opset_imports=[o for o in opset_imports if o.domain in ("", "ai.onnx")],
        attributes=["tier_dims", "value_dims", "kv_heads", "scale", "softcap", "plugin_namespace", "plugin_version"],
        doc_string="attend_static in standard ONNX ops: fallback for runtimes without the mdkv kernel",
    )


# --------------------------------------------------------------------------------------------


def example_stores(
    model: torch.nn.Module, batch: int, capacity: int, tiers: tuple[tuple[int, int], ...]
) -> list[StaticStore]:
    """Zero stores of the export shapes (the exporter only needs shapes and dtypes)."""
    n_layers, _, n_kv, d = model_dims(model.config)
    dtype, device = model.dtype, model.device
    owners = batch * n_kv
    tier_dims, value_dims = _split(tiers)

    def zeros(*shape: int, dtype: torch.dtype = dtype) -> torch.Tensor:
        return torch.zeros(*shape, dtype=dtype, device=device)

    out = []
    for _ in range(n_layers):
        bases = [zeros(owners, d, r) for r in _basis_widths(tiers)] if len(tiers) > 1 else [None, None]
        out.append(StaticStore(
            tier_dims, zeros(owners, capacity), zeros(owners, capacity), zeros(owners, len(tiers), dtype=torch.int32),
            bases[0], bases[1], batch, n_kv, d, value_dims,
        ))
    return out


def export_onnx(
    model: torch.nn.Module,
    cfg: MixedDimKVConfig | None,
    out_dir: str | Path,
    *,
    batch: int = 1,
    max_prompt_tokens: int = 512,
    max_new_tokens: int = 64,
    capacity: int | None = None,
    prefill_source: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Export the decode step of `model` under MixedDimKV `cfg` (None: the config `mdkv.patch` set)
    to `out_dir`. `capacity` (units per KV head per row) fixes the store shape; default: twice the
    budget's share of a `max_prompt_tokens` prompt. The new-token region holds `max_new_tokens`.
    `prefill_source`: where `OnnxGenerator` loads the PyTorch prefill model from (a path or an
    `mdkv_compile.assets` name); None saves the weights into out_dir/prefill_model.
    Returns out_dir."""
    import onnx

    cfg = cfg or patched_config(model)
    if cfg is None:
        raise ExportError("no MixedDimKVConfig: pass cfg or call mdkv.patch(model, cfg) first")
    _check_exportable(model, cfg, out_dir, overwrite)
    out_dir = Path(out_dir).expanduser().resolve()
    n_layers, n_heads, n_kv, d = model_dims(model.config)
    tiers = export_tiers(cfg, d)
    tier_dims, value_dims = _split(tiers)
    has_basis = len(tiers) > 1
    capacity = capacity or default_capacity(cfg, d, max_prompt_tokens)
    if capacity < 1 or max_new_tokens < 1 or batch < 1:
        raise ExportError("capacity, max_new_tokens and batch must be positive")

    dtype, device = model.dtype, model.device
    stores = example_stores(model, batch, capacity, tiers)
    # Distinct tensors everywhere: torch.export treats one tensor passed twice as aliased inputs
    # and traces a graph that reads the same buffer for both.
    regions = [
        tuple(torch.zeros(batch, n_kv, max_new_tokens, d, dtype=dtype, device=device) for _ in range(2))
        for _ in range(n_layers)
    ]
    flat = []
    for s, (k, v) in zip(stores, regions, strict=True):
        flat += [*s.tensors(), k, v]
    input_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
    position_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
    n_new = torch.tensor(0, dtype=torch.long, device=device)
    in_cache, out_cache = cache_names(n_layers, has_basis)
    input_names = ["input_ids", "position_ids", "n_new", *in_cache]
    output_names = ["logits", "n_new_out", *out_cache]

    from transformers import AttentionInterface

    AttentionInterface.register(EXPORT_ATTN, _export_attention)
    step = DecodeStep(model, tiers).eval()
    orig_impl = model.config._attn_implementation
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A sibling of the export's own (absolute) path, made with the user's umask (mkdtemp's 0700
    # would end up as the export's mode).
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:12]}")
    tmp.mkdir()
    try:
        model.set_attn_implementation(EXPORT_ATTN)
        try:
            with torch.no_grad():
                program = torch.onnx.export(
                    step, (input_ids, position_ids, n_new, *flat), dynamo=True, opset_version=OPSET,
                    input_names=input_names, output_names=output_names,
                    custom_translation_table=_translation(), optimize=True,
                )
        finally:
            model.set_attn_implementation(orig_impl)
            _TRACE.layers = None
        proto = program.model_proto
        mdkv_nodes = [n for n in proto.graph.node if n.domain == DOMAIN]
        if len(mdkv_nodes) != n_layers:
            raise ExportError(f"expected {n_layers} {DOMAIN}::{OP_NAME} nodes, the exporter produced {len(mdkv_nodes)}")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in mdkv_nodes[0].attribute}
        for node in mdkv_nodes[1:]:
            other = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if other != attrs:
                raise ExportError(
                    f"layers disagree on attention attributes ({attrs} vs {other}); one function cannot serve both"
                )
        attrs["tier_dims"], attrs["value_dims"] = list(attrs["tier_dims"]), list(attrs["value_dims"])
        q_example = torch.zeros(batch, n_heads, 1, d, dtype=dtype, device=device)
        fn_example = [q_example, *stores[0].tensors()[:3], regions[0][0], regions[0][1], n_new + 1]
        if has_basis:
            fn_example += [stores[0].basis_k, stores[0].basis_v]
        proto.functions.append(_function_proto(fn_example, attrs, proto.opset_import))
        if not any(o.domain == DOMAIN for o in proto.opset_import):
            proto.opset_import.append(onnx.helper.make_opsetid(DOMAIN, OP_VERSION))
        big = proto.ByteSize() > 1_800_000_000
        onnx.save(proto, str(tmp / "decode.onnx"), save_as_external_data=big, location="decode.onnx.data")

        if prefill_source is None:
            model.save_pretrained(tmp / "prefill_model")
            prefill = "prefill_model"
        else:
            prefill = prefill_source
        cache_bytes = sum(s.stored_bytes() for s in stores)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "files": {"decode": "decode.onnx"},
            "prefill": {"runtime": "pytorch", "model": prefill, "model_type": model.config.model_type},
            "config": _cfg_dict(cfg),
            "method": cfg.method,
            "budget": cfg.budget,
            "tier_dims": list(tier_dims),
            "value_dims": list(value_dims),
            "capacity": capacity,
            "new_capacity": max_new_tokens,
            "max_prompt_tokens": max_prompt_tokens,
            "batch": batch,
            "dtype": str(dtype).removeprefix("torch."),
            "model": {"num_layers": n_layers, "num_heads": n_heads, "kv_heads": n_kv, "head_dim": d,
                      "vocab_size": model.config.get_text_config(decoder=True).vocab_size},
            "store_bytes": cache_bytes,
            "node": {"domain": DOMAIN, "op_type": OP_NAME, "count": n_layers,
                     "plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION,
                     "attributes": {k: v for k, v in attrs.items() if not isinstance(v, bytes)}},
            "inputs": _io_spec(proto.graph.input),
            "outputs": _io_spec(proto.graph.output),
            "opset": OPSET,
            "versions": _versions(),
        }
        write_manifest(tmp, manifest)
        _install(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the new folder: everything in it was written here
        raise
    return out_dir


def _cfg_dict(cfg: MixedDimKVConfig) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def _io_spec(values) -> list[dict[str, Any]]:
    import onnx

    out = []
    for v in values:
        t = v.type.tensor_type
        out.append({
            "name": v.name,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
            "shape": [dim.dim_value if dim.HasField("dim_value") else dim.dim_param for dim in t.shape.dim],
        })
    return out
