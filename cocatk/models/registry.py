"""The model registry: presets, names and weights resolved to a :class:`ModelSpec`, downloads and digests.

A model is named by a *preset* (``coca-l14``, ``coca-b32``, ``coca-l14-coco``), by an open_clip architecture
(``coca_ViT-B-32``, or any dual encoder: ``ViT-B-32``, ``ViT-B-16-SigLIP``, ``EVA02-B-16``), or by the path of an
open_clip model config JSON. Weights (``pretrained``) are an open_clip tag, a local checkpoint file, or ``"none"``
for seeded random weights (tests and benchmarks). Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import config
from .._imports import ensure_open_clip_extras
from ..errors import (
    ModelConfigError,
    UnknownModelError,
    WeightsNotFoundError,
)

if TYPE_CHECKING:  # pragma: no cover
    pass


ASSETS_DIR = Path(__file__).parent.parent / "assets"

#: The weight value that asks for seeded random weights.
RANDOM_WEIGHTS = "none"
#: Seed of random-weight models: every process builds identical weights from it.
RANDOM_SEED = 0
#: The preset trained by cocatk on synthetic scenes (cocatk/assets), and what its users are told.
DEMO_PRESET = "demo"
DEMO_NOTICE = (
    "the demo model knows only synthetic coloured shapes (`cocatk demo`): on real photos its results mean nothing; "
    "use --model coca-b32 or coca-l14"
)
RANDOM_NOTICE = "random weights (--pretrained none): the scores carry no meaning beyond tests and speed"
#: Model families (``ClipModel.kind``).
KINDS = ("coca", "clip", "siglip")
#: What a user of a dual encoder is told when a feature needs CoCa's decoder.
DECODER_HINT = (
    "pass --rerank-model coca-l14 (or any CoCa: coca-b32, demo, a CoCa config JSON) to rerank with a separate "
    "CoCa, --reranker blip-itm, or --no-rerank; captions and likelihood scoring need --model set to a CoCa"
)


@dataclass(frozen=True)
class Preset:
    """A short model name: an open_clip architecture plus its weights (plain data, no torch needed)."""

    name: str
    arch: str
    pretrained: str
    embed_dim: int
    description: str
    #: Hugging Face repo holding the weights (for the cache check and the "missing weights" hint).
    hf_repo: str | None = None
    #: For presets shipped with cocatk: config and weights file names inside ``cocatk/assets``.
    config_file: str | None = None


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "coca-l14",
            "coca_ViT-L-14",
            "laion2b_s13b_b90k",
            768,
            "CoCa ViT-L/14 on LAION-2B (75.6 % ImageNet zero-shot); the default with a CUDA GPU",
            hf_repo="laion/CoCa-ViT-L-14-laion2B-s13B-b90k",
        ),
        Preset(
            "coca-b32",
            "coca_ViT-B-32",
            "laion2b_s13b_b90k",
            512,
            "CoCa ViT-B/32 on LAION-2B (63.3 % ImageNet zero-shot); 6x cheaper than L/14; the default without a "
            "CUDA GPU",
            hf_repo="laion/CoCa-ViT-B-32-laion2B-s13B-b90k",
        ),
        Preset(
            "coca-l14-coco",
            "coca_ViT-L-14",
            "mscoco_finetuned_laion2b_s13b_b90k",
            768,
            "CoCa ViT-L/14 fine-tuned on MS-COCO captions (better COCO retrieval, 72.0 % ImageNet)",
            hf_repo="laion/mscoco_finetuned_CoCa-ViT-L-14-laion2B-s13B-b90k",
        ),
    ]
}

# open_clip's file names inside a weights repo; safetensors is tried first, like open_clip does.
_HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _register_shipped_presets() -> None:
    """Add presets whose config and weights ship in ``cocatk/assets`` (``<name>.preset.json`` files)."""
    if not ASSETS_DIR.is_dir():
        return
    for path in sorted(ASSETS_DIR.glob("*.preset.json")):
        data = json.loads(path.read_text())
        PRESETS[data["name"]] = Preset(
            name=data["name"],
            arch=data["arch"],
            pretrained=str(ASSETS_DIR / data["weights"]),
            embed_dim=int(data["embed_dim"]),
            description=data["description"],
            config_file=str(ASSETS_DIR / data["config"]),
        )


_register_shipped_presets()


def _sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


#: Files at least this big have their sha256 remembered (:func:`_weights_sha256`); smaller ones hash in < 10 ms.
DIGEST_CACHE_MIN_BYTES = 16 << 20
#: A digest is not remembered for a file changed this recently: a write within the same timestamp tick could leave
#: its stat unchanged (git's "racily clean" files).
_DIGEST_SETTLE_NS = 2_000_000_000


def _weights_sha256(path: Path) -> str:
    """sha256 of a weights file, remembered in ``$COCATK_CACHE/file-digests.json`` under the file's path and stat
    (size, mtime and ctime in ns, inode, device), as git's index does: a search that checks which model built its
    index re-hashed a 1 GB checkpoint in every process (1.2 s on 2 cores, benchmarks/bench_cold_start.py).

    Any change of the file changes its ctime (which no program can set back), so a remembered digest is the file's.
    An unreadable or corrupt cache file is ignored and rewritten.
    """
    st = path.stat()
    if st.st_size < DIGEST_CACHE_MIN_BYTES:
        return _sha256_file(path)
    key = str(path.resolve())
    stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
    cache = config.cache_dir() / "file-digests.json"
    try:
        known = json.loads(cache.read_text())
        entry = known.get(key) if isinstance(known, dict) else None
    except (OSError, ValueError):
        known, entry = {}, None
    if isinstance(entry, dict) and entry.get("stat") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = _sha256_file(path)
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _DIGEST_SETTLE_NS:
        known = known if isinstance(known, dict) else {}
        known[key] = {"stat": stamp, "sha256": digest}
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(known, indent=1))
            os.replace(tmp, cache)  # atomic: concurrent processes each write a whole file
        except OSError:  # a read-only cache folder costs the next process a re-hash, nothing else
            with contextlib.suppress(OSError):
                tmp.unlink()
    return digest


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model: which architecture and which weights.

    Attributes:
        name: what the user asked for (preset name, architecture or config path).
        arch: the open_clip architecture name the model is built from.
        pretrained: an open_clip tag, an absolute checkpoint path, or ``"none"``.
        preset: the preset name when ``name`` was one.
        config_path: the custom config JSON, when there is one.
        kind: the family, ``"coca"``, ``"clip"`` or ``"siglip"`` (from the architecture's config).
    """

    name: str
    arch: str
    pretrained: str
    preset: str | None = None
    config_path: str | None = None
    kind: str = "coca"

    @property
    def has_decoder(self) -> bool:
        """True for CoCa: caption likelihood, rerank and captions need the multimodal decoder."""
        return self.kind == "coca"

    @property
    def weights_kind(self) -> str:
        """``"random"``, ``"file"`` or ``"tag"``."""
        if self.pretrained == RANDOM_WEIGHTS:
            return "random"
        if os.sep in self.pretrained or Path(self.pretrained).suffix in (".bin", ".pt", ".pth", ".safetensors"):
            return "file"
        return "tag"

    @property
    def is_random(self) -> bool:
        return self.weights_kind == "random"

    def weights_id(self) -> str:
        """A stable id of the weights for manifests and caches: the tag, ``sha256:...`` of a file, or
        ``random:seed0``."""
        kind = self.weights_kind
        if kind == "random":
            return f"random:seed{RANDOM_SEED}"
        if kind == "file":
            return "sha256:" + _weights_sha256(Path(self.pretrained))
        return self.pretrained

    def identity(self) -> dict[str, str]:
        """What an index or classifier cache records to recognise the model that built it."""
        arch = self.arch
        if self.config_path:
            arch = f"{self.arch}@sha256:{_sha256_file(Path(self.config_path))[:16]}"
        return {"model": self.preset or self.name, "arch": arch, "weights": self.weights_id()}


def _available_names() -> str:
    return ", ".join(sorted(PRESETS))


def _open_clip_coca_archs() -> list[str]:
    import open_clip

    return [m for m in open_clip.list_models() if "multimodal_cfg" in (open_clip.get_model_config(m) or {})]


def kind_of_config(cfg: dict[str, Any]) -> str:
    """The family of an open_clip model config: ``coca`` (a multimodal decoder), ``siglip`` (a learned logit bias:
    sigmoid scoring) or ``clip``."""
    if "multimodal_cfg" in cfg:
        return "coca"
    if cfg.get("init_logit_bias") is not None:
        return "siglip"
    return "clip"


def _family_examples() -> str:
    return "CoCa (coca_ViT-B-32, coca_ViT-L-14), CLIP (ViT-B-32, ViT-L-14), SigLIP (ViT-B-16-SigLIP), EVA (EVA02-B-16)"


def resolve_model(name: str | None = None, pretrained: str | None = None, device: str | None = None) -> ModelSpec:
    """Turn a user's ``--model`` / ``--pretrained`` into a :class:`ModelSpec` without loading anything.

    Args:
        name: preset, open_clip architecture (CoCa, CLIP, SigLIP, EVA...), or path to an open_clip config JSON.
            None means ``$COCATK_MODEL``, else the model that fits the machine: ``coca-l14`` on a CUDA GPU,
            ``coca-b32`` on the CPU (:func:`cocatk.config.default_model_choice`).
        pretrained: open_clip tag, checkpoint path, or ``"none"``. None means ``$COCATK_PRETRAINED`` or the
            preset's / architecture's default tag.
        device: where the model will run, for the default ``name`` only (None: ``$COCATK_DEVICE``, else a CUDA GPU
            when there is one).

    Raises:
        UnknownModelError: the name is not a preset, an open_clip architecture or a config file.
        WeightsNotFoundError: ``pretrained`` looks like a path but the file does not exist.
    """
    name = (name or config.default_model(device)).strip()
    if pretrained is None:
        pretrained = config.default_pretrained()
    if not name:
        raise UnknownModelError("empty model name", hint=f"use one of: {_available_names()}")

    if name in PRESETS:
        preset = PRESETS[name]
        if preset.config_file:
            _register_config(Path(preset.config_file))
        spec = ModelSpec(
            name=name,
            arch=preset.arch,
            pretrained=pretrained or preset.pretrained,
            preset=name,
            config_path=preset.config_file,
            kind="coca",
        )
    elif name.endswith(".json") or os.sep in name:
        path = Path(name).expanduser()
        if not path.is_file():
            raise UnknownModelError(
                f"model config file {name} not found",
                hint=f"pass an existing open_clip config JSON, or a preset: {_available_names()}",
            )
        arch, kind = _register_config(path)
        if not pretrained:
            raise WeightsNotFoundError(
                f"custom model config {path.name} has no default weights",
                hint="pass --pretrained PATH (a checkpoint for this config) or --pretrained none for random weights",
            )
        spec = ModelSpec(
            name=str(path.resolve()), arch=arch, pretrained=pretrained, config_path=str(path.resolve()), kind=kind
        )
    else:
        import open_clip

        cfg = open_clip.get_model_config(name) if name in open_clip.list_models() else None
        if not cfg or "vision_cfg" not in cfg:
            raise UnknownModelError(
                f"unknown model '{name}'",
                hint=f"use a preset ({_available_names()}), an open_clip architecture of a family: "
                f"{_family_examples()} (`python -c 'import open_clip; print(open_clip.list_models())'` lists all), "
                "or the path of an open_clip config JSON; `cocatk models` lists the presets",
            )
        ensure_open_clip_extras(cfg)
        spec = ModelSpec(name=name, arch=name, pretrained=pretrained or _default_tag(name), kind=kind_of_config(cfg))

    if spec.weights_kind == "file":
        path = Path(spec.pretrained).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(
                f"checkpoint file {spec.pretrained} not found",
                hint="pass the path of an existing open_clip checkpoint (.bin, .pt or .safetensors) to --pretrained",
            )
        spec = ModelSpec(spec.name, spec.arch, str(path.resolve()), spec.preset, spec.config_path, spec.kind)
    elif spec.weights_kind == "tag":
        _check_tag(spec.arch, spec.pretrained)
    return spec


def _register_config(path: Path) -> tuple[str, str]:
    """Register a custom open_clip config (process-global registry); return its architecture name and family."""
    import open_clip

    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelConfigError(
            f"cannot read model config {path}: {e}", hint="pass a valid open_clip config JSON"
        ) from e
    if not isinstance(cfg, dict) or "vision_cfg" not in cfg or "text_cfg" not in cfg:
        raise ModelConfigError(
            f"{path} is not an open_clip model config (no vision_cfg / text_cfg)",
            hint="start from open_clip's model_configs/coca_ViT-B-32.json (CoCa) or ViT-B-32.json (CLIP)",
        )
    open_clip.add_model_config(str(path))
    ensure_open_clip_extras(cfg)
    return path.stem, kind_of_config(cfg)


def _default_tag(arch: str) -> str:
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(arch)
    if "laion2b_s13b_b90k" in tags:
        return "laion2b_s13b_b90k"
    if tags:
        return tags[0]
    raise WeightsNotFoundError(
        f"architecture {arch} has no published weights",
        hint="pass --pretrained PATH (a checkpoint) or --pretrained none for random weights",
    )


def _check_tag(arch: str, tag: str) -> None:
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tag not in tags:
        raise UnknownModelError(
            f"unknown pretrained tag '{tag}' for {arch}",
            hint=f"use one of: {', '.join(tags) or '(none published)'}, a checkpoint path, or 'none'",
        )


def hf_repo_for(arch: str, tag: str) -> str | None:
    """The Hugging Face repo that open_clip downloads ``arch``/``tag`` from, if any."""
    import open_clip

    hub = (open_clip.get_pretrained_cfg(arch, tag) or {}).get("hf_hub", "")
    # open_clip writes 'org/repo/' or 'org/repo/filename'
    return "/".join(hub.split("/")[:2]) if hub.count("/") >= 1 else None


def cached_weights_path(repo: str | None) -> str | None:
    """Path of the weights in the local Hugging Face cache, or None. Never touches the network."""
    if not repo:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with open_clip
        return None
    for filename in _HF_WEIGHT_FILES:
        found = try_to_load_from_cache(repo_id=repo, filename=filename)
        if isinstance(found, str):
            return found
    return None


def list_presets() -> list[dict[str, Any]]:
    """The presets as plain dicts, with whether their weights are already on this machine (no network)."""
    rows = []
    for p in PRESETS.values():
        cached = Path(p.pretrained).is_file() if p.config_file else bool(cached_weights_path(p.hf_repo))
        rows.append(
            {
                "name": p.name,
                "arch": p.arch,
                "pretrained": Path(p.pretrained).name if p.config_file else p.pretrained,
                "embed_dim": p.embed_dim,
                "cached": cached,
                "description": p.description,
                "hf_repo": p.hf_repo,
            }
        )
    return rows


def download_weights(name: str, pretrained: str | None = None) -> str:
    """Fetch a model's weights into the Hugging Face cache (needs network) and return the local path.

    Raises:
        WeightsNotFoundError: the weights cannot be downloaded.
    """
    spec = resolve_model(name, pretrained)
    if spec.weights_kind != "tag":
        return spec.pretrained
    return fetch_tag_weights(spec.arch, spec.pretrained)


def hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached right now (None when it can), without waiting on retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout).close()
    except OSError as e:
        return f"{url.hostname} is unreachable ({type(e).__name__})"
    return None


def fetch_tag_weights(arch: str, tag: str, name: str | None = None) -> str:
    """Resolve a tag to a local file through open_clip's hub cache, or raise WeightsNotFoundError."""
    import open_clip
    from open_clip.pretrained import download_pretrained

    repo = hf_repo_for(arch, tag)
    local = cached_weights_path(repo)
    if local:
        return local
    reason = hub_unreachable_reason()
    path = None
    if reason is None:
        try:
            path = download_pretrained(open_clip.get_pretrained_cfg(arch, tag))
        except Exception as e:  # hub errors come in many types (offline, DNS, 404); all mean "not here"
            reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
    if not path:
        where = f"https://huggingface.co/{repo}" if repo else "the open_clip release page"
        preset = name or next((p.name for p in PRESETS.values() if (p.arch, p.pretrained) == (arch, tag)), arch)
        what = f"{preset} ({arch}/{tag})" if preset != arch else f"{arch}/{tag}"
        raise WeightsNotFoundError(
            f"weights for model {what} are not in the local Hugging Face cache and cannot be downloaded: {reason}",
            hint=f"on a machine with network run `cocatk models --download {preset}` (copy the hub cache over), or "
            f"fetch open_clip_pytorch_model.bin from {where} and pass "
            "--pretrained /path/to/open_clip_pytorch_model.bin; to try cocatk offline now, use --model demo "
            "(it knows synthetic coloured shapes only)",
        )
    return path
