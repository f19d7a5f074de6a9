"""The pooled-feature cache: every sample's encoders and pooling run once, training reads the result.

`build_feature_cache(model, entries, media_root, out)` (behind `merv-fast cache-features`) decodes each distinct
media item of a LLaVA dataset (a media key is the kind, the path and the clip window), runs the model's encoders and
pooling on it exactly as training does (same preprocessing, runner, autocast), and stores per encoder the pooled
tokens [L, C_e] (L = 1024 at merv-7b) and their means [C_e] (the fusion's keys: stored, not recomputed, because the
fused pooling op derives them from fp32 sums before rounding) in `storage_dtype` (bf16 by default: on a GPU training
casts the pooled tokens to bf16 before projecting, so bf16 storage loses nothing there). An image's per-frame encoders
are the tiled result, as in training.

Files under the cache directory: `shard-NNNNN.safetensors` (tensors `<encoder>.pooled` [n, L, C_e] and
`<encoder>.means` [n, C_e], plus `<encoder>.flip.*` for a flipping encoder), and `index.json`: the fingerprint, per
shard its file name, row count and SHA-256, `entries` (media key -> [shard, row]) and `failed` (media key -> the
decode error's reason). A shard's SHA-256 is checked the first time this process reads it.

The LanguageBind flip: training flips LanguageBind's frames with p = 0.5 per (seed, epoch, sample). The cache stores
BOTH variants for every encoder whose preprocessing flips (LanguageBind: ~2 MB more per video at merv-7b), and
training from the cache takes, per sample, the variant of the flip the dataset decides for it: the same features as
live training for every seed and epoch. The other encoders never flip and are stored once.

The fingerprint holds what determines the features: each encoder's config (architecture, layer taken, frames,
preprocessing spec, attention), a SHA-256 of its weights as they run (dtype included), the frame sampling (frames
sampled, the index rule), the pool size, the autocast dtype of the encoder forward, the storage dtype and the flip
policy. `FeatureCache.check(...)` refuses a cache built for anything else and names the first differing field. A
failed media item is recorded, so that training meets the same failure and the dataset's deterministic replacement
picks the same substitute as it would live; a sample that is neither stored nor failed is an error naming it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import torch

from merv_fast.data.dataset import Entry, VideoLLaVADataset
from merv_fast.data.media_types import MediaError
from merv_fast.kernels.pooling import pool_concat, square_grid
from merv_fast.model.visual import PooledFeatures
from merv_fast.progress import progress

CACHE_VERSION = 1
INDEX = "index.json"
FRAME_RULE = "linspace(first, last, frames_sampled) truncated; encoder e takes every (frames_sampled/frames_e)-th"
FLIP_POLICY = "both variants stored for encoders whose preprocessing flips; training takes the dataset's flip"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


class FeatureCacheError(ValueError):
    """A cache that cannot serve this run: another model or sampling, a corrupt shard, a missing sample."""


def media_key(entry: Entry) -> str:
    """What the features of a sample depend on in the data: its kind, media path and clip window."""
    clip = "" if entry.clip is None else f"@{entry.clip[0]}-{entry.clip[1]}"
    return f"{entry.kind}:{entry.media}{clip}"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(module: torch.nn.Module) -> str:
    """Identity of an encoder's weights as they run: names, dtypes, shapes and bytes of its state."""
    digest = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def fingerprint(model, autocast_dtype: torch.dtype | None, storage_dtype: str) -> dict[str, Any]:
    cfg = model.config
    if not model.visual.fixed_pooling:
        raise FeatureCacheError(f"visual.arch={cfg.visual.arch!r}: the feature cache stores pooled features, which "
                                f"only fixed pooling (3davg, avg) has; this pooling is learned or absent")
    encoders = []
    for enc_cfg in cfg.encoders:
        described = dataclasses.asdict(enc_cfg)
        described.pop("weights")  # the path is not the identity; the tensors are
        encoder = model.encoders[enc_cfg.name]
        described["weights_sha256"] = weights_sha256(encoder)
        described["weights_dtype"] = str(next(encoder.parameters()).dtype)
        encoders.append(described)
    described = {"version": CACHE_VERSION, "encoders": encoders,
                 "frame_sampling": {"frames_sampled": cfg.frames_sampled, "rule": FRAME_RULE},
                 "pool_size": list(model.pool_size), "autocast": str(autocast_dtype),
                 "storage_dtype": storage_dtype, "flip": FLIP_POLICY}
    return json.loads(json.dumps(described))  # as the index stores it (tuples become lists)


def first_difference(cached: Any, wanted: Any, path: str = "") -> str | None:
    """The first field where two fingerprints differ, as `path: cache X, this run Y`."""
    if isinstance(cached, dict) and isinstance(wanted, dict):
        for key in sorted(set(cached) | set(wanted)):
            found = first_difference(cached.get(key), wanted.get(key), f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    if isinstance(cached, list) and isinstance(wanted, list) and len(cached) == len(wanted):
        for i, (a, b) in enumerate(zip(cached, wanted)):
            name = a.get("name") if isinstance(a, dict) else None
            found = first_difference(a, b, f"{path}[{name or i}]")
            if found:
                return found
        return None
    if cached != wanted:
        return f"{path}: cache {cached!r}, this run {wanted!r}"
    return None


def _flipping(model) -> list[str]:
    return [e.name for e in model.config.encoders if e.preprocess.random_flip]


# ------------------------------------------------------------------------------------------------ building
def pooled_for(model, frames: list[torch.Tensor], is_image: bool, flip: bool, names: Sequence[str] | None,
               dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Encoder name -> (pooled [B, L, C_e], means [B, C_e]) for same-kind samples, as training computes them
    (`names`: only these encoders, each pooled alone; pooling is per column, so that changes no value)."""
    from merv_fast.data.preprocess import preprocess_batch

    cfg = model.config
    enc_dtype = next(model.encoders.parameters()).dtype
    flips = torch.full((len(frames),), flip, dtype=torch.bool)
    pixels = preprocess_batch(frames, cfg.encoders, cfg.frames_sampled, flips, enc_dtype,
                              is_image=torch.full((len(frames),), is_image))
    if names is None:
        features = model.encode(pixels, is_image=is_image)
        chosen = [e.name for e in cfg.encoders]
    else:
        chosen = list(names)
        features = []
        for e, px in zip(cfg.encoders, pixels):
            if e.name in chosen:
                features.append(model.encoders[e.name](px))  # a flipping encoder is a video encoder: no tiling
    pooled, means = pool_concat(features, [square_grid(f.shape[2]) for f in features], model.pool_size)
    out, start = {}, 0
    for name, f in zip(chosen, features):
        width = f.shape[-1]
        out[name] = (pooled[..., start:start + width].to(dtype), means[..., start:start + width].to(dtype))
        start += width
    return out


class _ShardWriter:
    def __init__(self, out: Path, shard_size: int):
        self.out, self.shard_size = out, shard_size
        self.rows: dict[str, list[torch.Tensor]] = {}
        self.count = 0
        self.shards: list[dict] = []
        self.entries: dict[str, list[int]] = {}

    def add(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            self.rows.setdefault(name, []).append(t.cpu())
        self.entries[key] = [len(self.shards), self.count]
        self.count += 1
        if self.count == self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.count:
            return
        from safetensors.torch import save_file

        name = f"shard-{len(self.shards):05d}.safetensors"
        save_file({k: torch.stack(v).contiguous() for k, v in self.rows.items()}, str(self.out / name))
        self.shards.append({"file": name, "rows": self.count, "sha256": _sha256_file(self.out / name)})
        self.rows, self.count = {}, 0


def build_feature_cache(model, entries: Sequence[Entry], media_root: str | Path, out: str | Path, *,
                        storage_dtype: str = "bfloat16", shard_size: int = 64, batch_size: int = 8,
                        decoder: str = "auto", autocast_dtype: torch.dtype | None = None,
                        show_progress: bool = True) -> dict:
    """Encode and pool every distinct media item of `entries` once; returns the index written to `out/index.json`.
    `autocast_dtype` must be what training uses (bf16 on a GPU, None on CPU: `training_autocast(device)`)."""
    from merv_fast.data.dataset import load_media

    if storage_dtype not in DTYPES:
        raise FeatureCacheError(f"storage dtype {storage_dtype!r}; choose one of {sorted(DTYPES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = DTYPES[storage_dtype]
    device = next(model.encoders.parameters()).device
    flipping = _flipping(model)
    writer = _ShardWriter(out, shard_size)
    failed: dict[str, str] = {}
    todo: dict[str, Entry] = {}
    for entry in entries:
        if entry.kind != "text":
            todo.setdefault(media_key(entry), entry)
    model.eval()
    bar = progress(len(todo), "cache-features", "media items", show_progress)
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    for kind in ("video", "image"):
        keys = [k for k, e in todo.items() if e.kind == kind]
        for start in range(0, len(keys), batch_size):
            loaded = []
            for key in keys[start:start + batch_size]:
                try:
                    frames = load_media(todo[key], media_root, decoder, frames=model.config.frames_sampled)
                except MediaError as err:
                    failed[key] = err.reason
                    continue
                loaded.append((key, torch.as_tensor(frames).to(device)))
            bar.update(len(keys[start:start + batch_size]))
            if not loaded:
                continue
            frames = [f for _, f in loaded]
            with torch.no_grad(), autocast:
                plain = pooled_for(model, frames, kind == "image", False, None, dtype)
                mirrored = pooled_for(model, frames, kind == "image", True, flipping, dtype) if flipping else {}
            for row, (key, _) in enumerate(loaded):
                tensors = {}
                for name, (pooled, means) in plain.items():
                    tensors[f"{name}.pooled"], tensors[f"{name}.means"] = pooled[row], means[row]
                for name, (pooled, means) in mirrored.items():
                    tensors[f"{name}.flip.pooled"], tensors[f"{name}.flip.means"] = pooled[row], means[row]
                writer.add(key, tensors)
    writer.flush()
    bar.close()
    index = {"fingerprint": fingerprint(model, autocast_dtype, storage_dtype), "shards": writer.shards,
             "entries": writer.entries, "failed": failed}
    (out / INDEX).write_text(json.dumps(index, indent=1))
    return index


# ------------------------------------------------------------------------------------------------ reading
class FeatureCache:
    """A built cache, read lazily: a shard is hashed the first time it is read, then memory-mapped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index_file = self.path / INDEX
        if not index_file.is_file():
            raise FeatureCacheError(f"feature cache {str(self.path)!r} has no {INDEX} (build it with "
                                    f"`merv-fast cache-features`)")
        try:
            index = json.loads(index_file.read_text())
            self.fingerprint, self.shards = index["fingerprint"], index["shards"]
            self.entries, self.failed = index["entries"], index["failed"]
        except (ValueError, KeyError) as err:
            raise FeatureCacheError(f"feature cache index {str(index_file)!r} is unreadable: {err}") from None
        self._open: dict[int, Any] = {}

    def __getstate__(self) -> dict:  # DataLoader workers get a copy without the open (unpicklable) shard handles
        state = dict(self.__dict__)
        state["_open"] = {}
        return state

    def check(self, model, autocast_dtype: torch.dtype | None) -> None:
        """Refuse a cache whose features another model, weights, sampling or precision would have produced."""
        wanted = fingerprint(model, autocast_dtype, self.fingerprint.get("storage_dtype", "bfloat16"))
        diff = first_difference(self.fingerprint, wanted)
        if diff:
            raise FeatureCacheError(f"feature cache {str(self.path)!r} was built for another configuration: {diff}")

    def verify(self) -> None:
        """Hash every shard now (otherwise each is checked when first read)."""
        for i in range(len(self.shards)):
            self._shard(i)

    def _shard(self, i: int):
        if i not in self._open:
            from safetensors import safe_open

            meta = self.shards[i]
            file = self.path / meta["file"]
            if not file.is_file():
                raise FeatureCacheError(f"feature cache shard {str(file)!r} is missing")
            actual = _sha256_file(file)
            if actual != meta["sha256"]:
                raise FeatureCacheError(f"feature cache shard {str(file)!r} is corrupt: SHA-256 {actual}, "
                                        f"index says {meta['sha256']}")
            try:
                self._open[i] = safe_open(str(file), framework="pt")
            except Exception as err:  # a shard whose hash matches but safetensors cannot parse: still this shard's
                raise FeatureCacheError(f"feature cache shard {str(file)!r} is unreadable: {err}") from None
        return self._open[i]

    def row(self, key: str) -> tuple[Any, int]:
        if key not in self.entries:
            raise FeatureCacheError(f"media {key!r} is not in the feature cache {str(self.path)!r} "
                                    f"(built for another dataset? rebuild with `merv-fast cache-features`)")
        shard, row = self.entries[key]
        return self._shard(shard), row

    def features(self, keys: Sequence[str], flips: Sequence[bool], encoder_names: Sequence[str],
                 device: torch.device | str = "cpu") -> PooledFeatures:
        """Per sample (media key, LanguageBind flip) -> PooledFeatures [B, L, K] / [B, K] in the encoders' order."""
        encoders = {e["name"]: e for e in self.fingerprint["encoders"]}
        pooled, means = [], []
        for key, flip in zip(keys, flips):
            shard, row = self.row(key)
            p, m = [], []
            for name in encoder_names:
                variant = f"{name}.flip" if flip and encoders[name]["preprocess"]["random_flip"] else name
                p.append(shard.get_slice(f"{variant}.pooled")[row])
                m.append(shard.get_slice(f"{variant}.means")[row])
            pooled.append(torch.cat(p, dim=-1))
            means.append(torch.cat(m, dim=-1))
        return PooledFeatures(torch.stack(pooled).to(device, non_blocking=True),
                              torch.stack(means).to(device, non_blocking=True))


class CachedFeatureDataset(VideoLLaVADataset):
    """The training dataset over a feature cache: media are not decoded (a sample's `frames` is a 1-pixel
    placeholder); a media item that failed when the cache was built fails again with the same reason, so the
    deterministic replacement is the one live training makes; one the cache does not know is an error naming it."""

    def __init__(self, cache: FeatureCache, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cache = cache

    def _load(self, position: int) -> Any:
        entry = self.entries[position]
        if entry.kind == "text":
            return None
        key = media_key(entry)
        if key in self.cache.failed:
            raise MediaError(str(self.media_root / entry.media), self.cache.failed[key])
        if key not in self.cache.entries:
            raise FeatureCacheError(f"entry {entry.index} (id {entry.id!r}): media {key!r} is not in the feature "
                                    f"cache {str(self.cache.path)!r}")
        return torch.zeros(1, 1, 1, 3, dtype=torch.uint8)

    def features_for(self, batch, encoder_names: Sequence[str], device) -> PooledFeatures:
        keys = [media_key(self.entries[i]) for i in batch.indices]
        return self.cache.features(keys, batch.flip.tolist(), encoder_names, device)


def training_autocast(device: torch.device) -> torch.dtype | None:
    """The autocast dtype the training loop runs the encoders under on `device` (merv_fast/train/loop.py)."""
    return torch.bfloat16 if device.type == "cuda" else None


def cache_dataset(data_json: str | Path, media_root: str | Path | None, out: str | Path, model_cfg, *,
                  seed: int = 0, device: str | None = None, **options: Any) -> dict:
    """`merv-fast cache-features`: the model built as `merv-fast train` builds it (same seed, device and encoder
    dtype, so random-init test encoders match too), then `build_feature_cache` over the dataset's media."""
    from merv_fast.data.dataset import load_entries
    from merv_fast.model.merv import build_model

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    media_root = media_root if media_root is not None else Path(data_json).parent
    torch.manual_seed(seed)
    model = build_model(config=model_cfg, device=dev)
    return build_feature_cache(model, load_entries(data_json), media_root, out,
                               autocast_dtype=training_autocast(dev), **options)
