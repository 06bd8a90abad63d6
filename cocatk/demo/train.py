"""Train the ``demo`` CoCa on synthetic scenes, offline and deterministic.

Usage::

    python -m cocatk.demo.train --out DIR [--steps N] [--batch B] [--device cpu|cuda] [--seed S]
    python -m cocatk.demo.train --out cocatk/assets      # rebuild the shipped preset in place

A small open_clip CoCa (real ``CoCa`` classes, the real CLIP tokenizer with a 16-token context) learns from scenes
rendered on the fly by :mod:`cocatk.demo.scenes` (every step sees new scenes, drawn from ``seed`` and the step
number only) in two stages:

1. image-tower warm-up (``--pretrain-steps``, default 1500 steps of 64 scenes, ~9 min on two CPU cores): the vision
   tower learns the scenes' own labels, which objects are present, how the first-named object stands to the other and
   what shape the object of a named colour has (:func:`pretrain_image_tower`); its heads are then thrown away;
2. CoCa (``--steps``, default 1600 steps of 64, ~13 min): ``open_clip.loss.CoCaLoss`` (contrastive + 2 x
   captioning), a quarter of the scenes followed by a hard-negative twin, AdamW with a linear warmup, the peak rate
   held, then a cosine decay over the last quarter. The caption softmax runs over the 18 token ids the captions use
   (:func:`corpus_vocab`) on 15 steps of 16 and over the whole 49,408-word vocabulary on every 16th
   (``--full-vocab-every``): the full output layer is most of a CPU step's cost.

The defaults train in about 22 minutes on two CPU cores (22.4 for the shipped weights). The run writes into ``--out``:

- ``coca_demo_tiny.json``: the open_clip model config (the file stem is the architecture name);
- ``demo.safetensors``: the weights in fp16 (cocatk loads them into an fp32 model);
- ``demo.preset.json``: what makes ``cocatk/assets`` list the model as preset ``demo``;
- ``demo_training.json``: the training record (settings, wall time, losses, held-out quality numbers).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .scenes import (
    CLASS_NAMES,
    COLOURS,
    INVERSE_RELATION,
    RELATIONS,
    SHAPES,
    SceneSpec,
    random_scene,
    render_scene,
    reshape_object,
    scene_rng,
    swap_objects,
)

ARCH = "coca_demo_tiny"
PRESET = "demo"
WEIGHTS_FILE = "demo.safetensors"
RECORD_FILE = "demo_training.json"

#: The model. Text width = decoder width = embed_dim (open_clip's CoCa needs it); the vocabulary stays 49408 so the
#: real CLIP tokenizer fits, which makes the token embedding and the decoder's output layer (2 x 49408 x 64 = 6.3 M
#: weights) most of the size. 16-token context: the longest caption has 10 tokens.
#: Vision: 64 px, 8 px patches (an 8 x 8 grid), 6 layers of width 64, with two choices that decide whether the model
#: can learn where things are (measured on this corpus, see README "The demo model"):
#: - fixed 2-D sin-cos position embeddings (open_clip's ``pos_embed_type: sin_cos_2d``): with open_clip's default
#:   learnable ones (initialised at std width**-0.5, ten times smaller than the patch content) a probe trained on the
#:   image tokens did not learn left/right/above/below at all in 600 steps; with sin-cos it reached 90 %;
#: - no attentional pooler: the decoder reads the 64 patch tokens and the contrastive embedding is the class token
#:   (vision width = embed_dim, so the tokens fit the decoder unprojected). Through a 17- or 65-query pooler, a
#:   decoder-like probe (cross-attention from the first object's name to the image tokens) learned only the axis of
#:   a relation, never its direction (0.43-0.45 in 600 steps); from the patch tokens it learned it (0.82 in 300).
CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {
        "image_size": 64,
        "layers": 6,
        "width": 64,
        "head_width": 32,
        "patch_size": 8,
        "pos_embed_type": "sin_cos_2d",
        "output_tokens": True,
    },
    "text_cfg": {
        "context_length": 16,
        "vocab_size": 49408,
        "width": 64,
        "heads": 4,
        "layers": 3,
        "embed_cls": True,
        "output_tokens": True,
    },
    "multimodal_cfg": {
        "context_length": 16,
        "vocab_size": 49408,
        "width": 64,
        "heads": 4,
        "layers": 3,
        "attn_pooler_heads": 4,
    },
    "custom_text": True,
}

#: The image-tower warm-up's loss, as the training record states it (:func:`pretrain_image_tower`).
WARMUP_LOSS = (
    "10 x BCE(object presence from the contrastive embedding) + CE(relation of the first-named object) + "
    "CE(shape of the object of the first-named object's colour, skipped when both objects share it); the last two "
    "read from the image tokens by 2 cross-attention layers; heads discarded"
)
# open_clip's CoCa recipe weighs captioning twice as much as the contrastive loss.
CAPTION_LOSS_WEIGHT = 2.0
CLIP_LOSS_WEIGHT = 1.0
# Share of training images drawn larger, with a random aspect ratio, and brought to 64 px by the model's own
# preprocessing (resize + centre crop), the path user photos take; the rest are drawn at 64 px directly (cheaper).
_PREPROCESS_SHARE = 0.3
# Share of scenes followed in their batch by a hard-negative twin (:func:`hard_negative`: the two objects' places
# swapped, or one object's shape changed). A random batch seldom holds two scenes that differ only there, so without
# twins the contrastive loss has no reason to encode where each object is or, early on, its shape.
_TWIN_SHARE = 0.25
# CLIP normalisation (open_clip's OPENAI_DATASET_MEAN / STD), for the images drawn at 64 px.
_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


#: Share of one-object scenes.
_P_SINGLE = 0.35
#: The learning rate stays at its peak until this share of the steps is left, then decays (cosine) to 0. Shape is
#: learned late: a ViT of this size trained on shape alone sat at chance for ~400 steps of 64 scenes at lr 1e-3
#: before it rose to 90 % by step 900; a cosine decay over the whole run had spent most of its rate by then.
_DECAY_SHARE = 0.25


def hard_negative(spec: SceneSpec, rng: Any) -> SceneSpec:
    """A twin of ``spec`` that differs in one thing a random batch rarely contrasts: for two objects, their places
    swapped (half the time) or one object's shape; for one object, its shape."""
    if len(spec.objects) == 2 and rng.random() < 0.5:
        return swap_objects(spec)
    return reshape_object(spec, rng)


class SceneBatches:
    """Batch ``step`` of a run: images (B, 3, S, S) and caption ids (B, context), from ``(seed, step)`` alone, so
    the data does not depend on the number of loader workers."""

    def __init__(
        self,
        seed: int,
        batch_size: int,
        steps: int,
        image_size: int,
        preprocess: Any,
        tokenizer: Any,
        twin_share: float = _TWIN_SHARE,
        p_single: float = _P_SINGLE,
    ):
        self.seed, self.batch_size, self.steps, self.twin_share = seed, batch_size, steps, twin_share
        self.p_single = p_single
        self.image_size, self.preprocess, self.tokenizer = image_size, preprocess, tokenizer

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> tuple[Any, Any]:
        images, scenes = self.draw(step)
        return images, self.tokenizer([spec.caption(inverse=inverse) for spec, inverse in scenes])

    def draw(self, step: int) -> tuple[Any, list[tuple[SceneSpec, bool]]]:
        """The images of batch ``step`` and, per image, its scene and whether its caption names the objects the
        other way round ("B right of A")."""
        import torch

        s = self.image_size
        images = np.empty((self.batch_size, 3, s, s), np.float32)
        scenes: list[tuple[SceneSpec, bool]] = []
        twin = None
        for j in range(self.batch_size):
            rng = scene_rng(self.seed, step * self.batch_size + j, namespace="train")
            if twin is not None:
                spec, twin = twin, None
            else:
                spec = random_scene(rng, p_single=self.p_single)
                if j + 1 < self.batch_size and rng.random() < self.twin_share:
                    twin = hard_negative(spec, rng)
            # Two-object scenes are described from either side ("A left of B" / "B right of A") at random.
            scenes.append((spec, len(spec.objects) == 2 and rng.random() < 0.5))
            if rng.random() < _PREPROCESS_SHARE:
                size = (rng.randint(s, 2 * s), rng.randint(s, 2 * s))
                images[j] = self.preprocess(render_scene(spec, size)).numpy()
            else:
                arr = np.asarray(render_scene(spec, s), np.float32) / 255.0
                images[j] = ((arr - _MEAN) / _STD).transpose(2, 0, 1)
        return torch.from_numpy(images), scenes


def corpus_vocab(tokenizer: Any) -> Any:
    """Every token id a demo caption can hold (start and end of text included), sorted, with the padding id 0 first:
    the 18 ids the decoder has to tell apart, of its 49,408."""
    import torch

    words = [f"a {c} {s}" for c in COLOURS for s in SHAPES] + [f"a {r} a" for r in RELATIONS]
    ids = tokenizer(words)
    return torch.cat([torch.zeros(1, dtype=ids.dtype), ids[ids != 0].unique()])


def coca_forward(model: Any, images: Any, ids: Any, vocab: Any = None) -> dict[str, Any]:
    """``CoCa.forward(images, ids)`` with the multimodal decoder run only up to the longest caption in the batch.

    The positions after it hold padding, which ``CoCaLoss`` ignores, and the decoder is causal, so the earlier
    positions do not see them: the loss is the same as with the full forward (tested), and on a CPU the decoder's
    49,408-word output layer, most of a training step, costs that much less (9 of 15 positions for the longest demo
    caption at context 16).

    With ``vocab`` (:func:`corpus_vocab`), the output layer is evaluated for those ids only: ``logits[..., j]`` is
    the full layer's logit of id ``vocab[j]`` and the labels are renumbered to match (padding stays 0), so
    ``CoCaLoss`` gives the caption loss of a softmax over the corpus's words alone (tested against slicing the full
    logits). A fraction of the cost; the full softmax also has to push the other 49,390 ids down, which ``train``
    does on every ``full_vocab_every``-th step.
    """
    import torch

    image_latent, image_embs = model._encode_image(images)
    text_latent, token_embs = model._encode_text(ids)
    n = int(ids.argmax(dim=-1).max()) + 1  # the end-of-text id (49407) is the largest id: its position + 1
    decoder, labels = model.text_decoder, ids[:, 1:n]
    if vocab is None:
        logits = decoder(image_embs, token_embs[:, : n - 1])
    else:
        projection = decoder.text_projection
        decoder.text_projection = None  # the decoder then returns its final hidden states
        try:
            hidden = decoder(image_embs, token_embs[:, : n - 1])
        finally:
            decoder.text_projection = projection
        logits = hidden @ projection[:, vocab]
        labels = torch.searchsorted(vocab, labels.contiguous())  # vocab is sorted and holds every caption id
    return {
        "image_features": image_latent,
        "text_features": text_latent,
        "logits": logits,
        "labels": labels,
        "logit_scale": model.logit_scale.exp(),
    }


def scene_labels(scenes: list[tuple[SceneSpec, bool]]) -> tuple[Any, Any, Any]:
    """Targets of the image-tower warm-up for a batch from :meth:`SceneBatches.draw`: which of the 18 objects are
    present (B, 18), the object the caption names first (B,; the only one in a one-object scene) and, for two-object
    scenes, its relation to the other (-1 for one-object scenes)."""
    import torch

    present = torch.zeros(len(scenes), len(CLASS_NAMES))
    first = torch.zeros(len(scenes), dtype=torch.long)
    relation = torch.full((len(scenes),), -1, dtype=torch.long)
    for i, (spec, inverse) in enumerate(scenes):
        for obj in spec.objects:
            present[i, CLASS_NAMES.index(obj.name)] = 1.0
        first[i] = CLASS_NAMES.index(spec.objects[0].name)
        if len(spec.objects) == 2 and spec.relation is not None:
            a, rel = (spec.objects[1], INVERSE_RELATION[spec.relation]) if inverse else (spec.objects[0], spec.relation)
            first[i], relation[i] = CLASS_NAMES.index(a.name), RELATIONS.index(rel)
    return present, first, relation


def _tower_heads(width: int) -> Any:
    """Heads of the warm-up, thrown away after it: object presence from the contrastive embedding, and, read from
    the image tokens by cross-attention as the caption decoder reads them, the relation of a named object to the
    other and the shape of the object of a named colour."""
    import torch
    from torch import nn

    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.present = nn.Linear(width, len(CLASS_NAMES))
            self.query = nn.Embedding(len(CLASS_NAMES), width)
            self.read = nn.ModuleList(
                nn.TransformerDecoderLayer(width, 4, 4 * width, 0.0, batch_first=True, norm_first=True)
                for _ in range(2)
            )
            self.relation = nn.Linear(width, len(RELATIONS))
            self.colour = nn.Embedding(len(COLOURS), width)
            self.shape = nn.Linear(width, len(SHAPES))

        def forward(self, latent: torch.Tensor, tokens: torch.Tensor, first: torch.Tensor) -> tuple[Any, Any, Any]:
            # Two independent reads per image (stacked on the batch axis, so neither query sees the other): by the
            # first object's name for its relation, by its colour alone for its shape.
            b = first.shape[0]
            x = torch.cat([self.query(first), self.colour(first // len(SHAPES))])[:, None]
            kv = torch.cat([tokens, tokens])
            for layer in self.read:
                x = layer(x, kv)
            return self.present(latent), self.relation(x[:b, 0]), self.shape(x[b:, 0])

    return Heads()


def _colour_names_one_object(present: Any) -> Any:
    """(B,) bool from presence targets (B, 18): no colour is on two objects, so a colour names one object (the shape
    read is skipped where both objects share a colour)."""
    return present.view(-1, len(COLOURS), len(SHAPES)).sum(-1).amax(-1) <= 1


def pretrain_image_tower(
    model: Any,
    data: SceneBatches,
    steps: int,
    lr: float,
    weight_decay: float,
    device: str = "cpu",
    log_every: int = 250,
) -> list[dict[str, float]]:
    """Warm up ``model.visual`` on the scenes' own labels (object presence, relations, shapes) before CoCa training.

    A CoCa this small learns colours from CoCaLoss within a few hundred steps, but shapes and relations only after
    far more scenes than 20 CPU minutes allow (measured: zero-shot 0.56, relations at chance after 1200 steps of 64
    from scratch). A step here costs about 0.35 s on two CPU cores for 64 scenes, against 0.9-1.0 s for a CoCa step
    with the full output layer (0.37 s with the corpus softmax), and its labels point straight at what the captions
    need. Returns the curve (losses, and on a fixed held-out batch the one-object shape accuracy and the relation
    accuracy).
    """
    import torch

    heads = _tower_heads(model.visual.output_dim).to(device)
    params = [p for p in model.visual.parameters() if p.requires_grad] + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=weight_decay)
    bce, ce = torch.nn.BCEWithLogitsLoss(), torch.nn.CrossEntropyLoss()
    val_images, val_scenes = SceneBatches(data.seed + 1, 256, 1, data.image_size, data.preprocess, None).draw(0)
    val_present, val_first, val_relation = scene_labels(val_scenes)
    warmup = max(1, steps // 30)
    curve: list[dict[str, float]] = []
    running = torch.zeros(3)
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup)
        images, scenes = data.draw(step)
        present, first, relation = (t.to(device) for t in scene_labels(scenes))
        latent, tokens = model.visual(images.to(device))
        p_logits, r_logits, s_logits = heads(latent, tokens, first)
        pairs = relation >= 0
        named = _colour_names_one_object(present)
        # Presence is 18 binary decisions averaged: weighted up to the scale of the 4-way relation loss.
        losses = torch.stack(
            [
                10 * bce(p_logits, present),
                ce(r_logits[pairs], relation[pairs]),
                ce(s_logits[named], (first % len(SHAPES))[named]),
            ]
        )
        opt.zero_grad(set_to_none=True)
        losses.sum().backward()
        opt.step()
        running += losses.detach().cpu()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            model.visual.eval()
            with torch.no_grad():
                latent, tokens = model.visual(val_images.to(device))
                p_logits, r_logits, s_logits = heads(latent, tokens, val_first.to(device))
            model.visual.train()
            single = val_present.sum(1) == 1
            pred = p_logits.cpu()[single].argmax(1)
            truth = val_present[single].argmax(1)
            shape_acc = float(((pred % len(SHAPES)) == (truth % len(SHAPES))).float().mean())  # colour-major
            pairs = val_relation >= 0
            rel_acc = float((r_logits.cpu()[pairs].argmax(1) == val_relation[pairs]).float().mean())
            named = _colour_names_one_object(val_present)
            read_acc = float((s_logits.cpu()[named].argmax(1) == (val_first % len(SHAPES))[named]).float().mean())
            n = (step + 1) - (curve[-1]["step"] if curve else 0)
            pres, rel, shp = (running / n).tolist()
            running.zero_()
            curve.append(
                {
                    "step": step + 1,
                    "presence": round(pres, 4),
                    "relation": round(rel, 4),
                    "shape": round(shp, 4),
                    "val_shape_acc": round(shape_acc, 3),
                    "val_read_shape_acc": round(read_acc, 3),
                    "val_relation_acc": round(rel_acc, 3),
                }
            )
            print(
                f"warm-up {step + 1}/{steps}  presence {pres:.3f}  relation {rel:.3f}  shape {shp:.3f}  held-out "
                f"shape {shape_acc:.2f} (read {read_acc:.2f}) relation {rel_acc:.2f}  {time.time() - t0:.0f}s",
                file=sys.stderr,
                flush=True,
            )
    return curve


def _lr_at(step: int, steps: int, warmup: int, lr: float, decay_share: float = _DECAY_SHARE) -> float:
    """Linear warmup, then ``lr`` held, then a cosine decay to 0 over the last ``decay_share`` of the steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    decay_start = max(warmup, round(steps * (1 - decay_share)))
    if step < decay_start:
        return lr
    progress = (step - decay_start) / max(1, steps - decay_start)
    return 0.5 * lr * (1 + math.cos(math.pi * progress))


def build_model(seed: int, config_path: Path) -> tuple[Any, Any, Any]:
    """The untrained model (seeded), its preprocessing and tokenizer; registers ``config_path`` with open_clip."""
    import open_clip
    import torch

    open_clip.add_model_config(str(config_path))
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(ARCH, pretrained=None)
    # open_clip leaves the decoder's output projection as torch.empty: initialise it like its siblings.
    with torch.no_grad():
        proj = model.text_decoder.text_projection
        torch.nn.init.normal_(proj, std=proj.shape[0] ** -0.5)
    return model, preprocess, open_clip.get_tokenizer(ARCH)


def _param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    # open_clip's rule: no weight decay on gains, biases, norms and the logit scale.
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        skip = p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
        (no_decay if skip else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def save_weights(model: Any, path: Path) -> None:
    """The state dict in fp16 safetensors (open_clip.load_checkpoint reads it into an fp32 model)."""
    import torch
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt", "arch": ARCH})


def train(
    out: Path,
    steps: int = 1600,
    batch_size: int = 64,
    pretrain_steps: int = 1500,
    lr: float = 1e-3,
    warmup: int | None = None,
    weight_decay: float = 0.1,
    seed: int = 0,
    device: str = "cpu",
    workers: int = 0,
    max_minutes: float | None = None,
    log_every: int = 25,
    eval_pairs: int = 200,
    eval_single: int = 360,
    init: Path | None = None,
    twin_share: float = _TWIN_SHARE,
    full_vocab_every: int = 16,
) -> dict[str, Any]:
    """Train, save the four files into ``out`` and return the training record (see the module docstring)."""
    import open_clip
    import torch
    from open_clip.loss import CoCaLoss

    out.mkdir(parents=True, exist_ok=True)
    config_path = out / f"{ARCH}.json"
    config_path.write_text(json.dumps(CONFIG, indent=2) + "\n")
    model, preprocess, tokenizer = build_model(seed, config_path)
    if init is not None:
        open_clip.load_checkpoint(model, str(init), strict=True, weights_only=True)
    model = model.to(device).train()
    vocab = corpus_vocab(tokenizer).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    warmup = warmup if warmup is not None else max(1, steps // 30)

    t_start = time.time()
    warmup_curve: list[dict[str, float]] = []
    if pretrain_steps:
        # Its own scene stream (seed + 1000), so the CoCa stage below still sees new scenes.
        tower_data = SceneBatches(
            seed + 1000, batch_size, pretrain_steps, CONFIG["vision_cfg"]["image_size"], preprocess, tokenizer
        )
        warmup_curve = pretrain_image_tower(model, tower_data, pretrain_steps, lr, weight_decay, device=device)
    pretrain_wall = time.time() - t_start

    data = SceneBatches(
        seed, batch_size, steps, CONFIG["vision_cfg"]["image_size"], preprocess, tokenizer, twin_share=twin_share
    )
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.startswith("cuda"),
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    loss_fn = CoCaLoss(caption_loss_weight=CAPTION_LOSS_WEIGHT, clip_loss_weight=CLIP_LOSS_WEIGHT, pad_id=0)
    opt = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    amp = device.startswith("cuda")
    max_logit_scale = math.log(100)

    curve: list[dict[str, float]] = []
    # Loss sums since the last log line, kept on the device (no sync per step).
    running = torch.zeros(2, device=device)
    t0 = time.time()
    done = 0
    for step, (images, ids) in enumerate(loader):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, warmup, lr)
        images = images.to(device, non_blocking=True)
        ids = ids.to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            # The corpus-word softmax, and open_clip's full one every full_vocab_every-th step.
            full = full_vocab_every > 0 and (step + 1) % full_vocab_every == 0
            outputs = coca_forward(model, images, ids, vocab=None if full else vocab)
            losses = loss_fn(**outputs, output_dict=True)
        loss = losses["contrastive_loss"] + losses["caption_loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, max_logit_scale)
        running += torch.stack([losses["contrastive_loss"], losses["caption_loss"]]).detach().float()
        done = step + 1
        if done % log_every == 0 or done == steps:
            c, k = (running / (done - (curve[-1]["step"] if curve else 0))).tolist()
            running.zero_()
            elapsed = time.time() - t0
            curve.append({"step": done, "contrastive": round(c, 4), "caption": round(k, 4)})
            print(
                f"step {done}/{steps}  contrastive {c:.3f}  caption {k:.3f}  "
                f"scale {model.logit_scale.exp().item():.1f}  lr {opt.param_groups[0]['lr']:.2e}  {elapsed:.0f}s",
                file=sys.stderr,
                flush=True,
            )
        if max_minutes is not None and time.time() - t0 > 60 * max_minutes:
            print(f"stopping after {done} steps: --max-minutes {max_minutes} reached", file=sys.stderr)
            break
    wall = time.time() - t0

    weights_path = out / WEIGHTS_FILE
    save_weights(model.eval(), weights_path)
    (out / f"{PRESET}.preset.json").write_text(
        json.dumps(
            {
                "name": PRESET,
                "arch": ARCH,
                "weights": WEIGHTS_FILE,
                "config": config_path.name,
                "embed_dim": CONFIG["embed_dim"],
                "description": "tiny CoCa trained on synthetic coloured-shape scenes (cocatk demo; works offline)",
            },
            indent=2,
        )
        + "\n"
    )

    # Held-out quality of the saved fp16 file, loaded the way users load it.
    from ..models import load_model
    from .quality import evaluate

    loaded = load_model(str(config_path), pretrained=str(weights_path), device=device)
    quality = evaluate(loaded, n_single=eval_single, n_pairs=eval_pairs)
    record = {
        "script": "python -m cocatk.demo.train",
        "argv": sys.argv[1:],
        "arch": ARCH,
        "parameters": n_params,
        "weights_bytes": weights_path.stat().st_size,
        "seed": seed,
        "init": str(init) if init else None,
        "twin_share": twin_share,
        "p_single": _P_SINGLE,
        "preprocess_share": _PREPROCESS_SHARE,
        "lr_schedule": f"linear warmup, held, cosine to 0 over the last {_DECAY_SHARE:.0%} of the steps",
        "image_tower_warmup": {
            "steps": pretrain_steps,
            "loss": WARMUP_LOSS,
            "wall_time_s": round(pretrain_wall, 1),
            "curve": warmup_curve,
        },
        "steps": done,
        "steps_planned": steps,
        "batch_size": batch_size,
        "lr": lr,
        "warmup_steps": warmup,
        "weight_decay": weight_decay,
        "loss": f"open_clip.loss.CoCaLoss(caption_loss_weight={CAPTION_LOSS_WEIGHT}, "
        f"clip_loss_weight={CLIP_LOSS_WEIGHT})",
        "caption_softmax": f"over all 49,408 token ids every {full_vocab_every}th step, over the corpus's "
        f"{len(vocab)} on the others (the curve's caption loss: the mean over both kinds)",
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "loader_workers": workers,
        "precision": "bf16 autocast" if amp else "fp32",
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "wall_time_s": round(pretrain_wall + wall, 1),
        "coca_wall_time_s": round(wall, 1),
        "final_losses": curve[-1] if curve else None,
        "loss_curve": curve,
        "eval": quality,
    }
    (out / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cocatk.demo.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the config, weights and record")
    parser.add_argument("--steps", type=int, default=1600, help="CoCaLoss steps (default 1600: ~13 min on 2 CPUs)")
    parser.add_argument(
        "--pretrain-steps", type=int, default=1500, help="image-tower warm-up steps first (default 1500: ~9 min)"
    )
    parser.add_argument("--batch", type=int, default=64, help="scenes per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=None, help="warmup steps (default steps / 30)")
    parser.add_argument("--seed", type=int, default=0, help="model init and training-scene seed")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--workers", type=int, default=0, help="data loader processes (0: render in the main one)")
    parser.add_argument("--init", type=Path, default=None, help="start from these weights (fine-tuning)")
    parser.add_argument("--twin-share", type=float, default=_TWIN_SHARE, help="scenes followed by a hard-negative twin")
    parser.add_argument(
        "--full-vocab-every",
        type=int,
        default=16,
        help="every N-th step takes the caption softmax over all 49,408 words, the others over the corpus's 18 "
        "(0: never; 1: always)",
    )
    parser.add_argument("--max-minutes", type=float, default=None, help="stop early after this much training time")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 2:
        parser.error("--steps must be >= 1 and --batch >= 2")
    if args.pretrain_steps < 0 or args.full_vocab_every < 0:
        parser.error("--pretrain-steps and --full-vocab-every must be >= 0")
    record = train(
        args.out,
        steps=args.steps,
        batch_size=args.batch,
        pretrain_steps=args.pretrain_steps,
        lr=args.lr,
        warmup=args.warmup,
        seed=args.seed,
        device=args.device,
        workers=args.workers,
        max_minutes=args.max_minutes,
        init=args.init,
        twin_share=args.twin_share,
        full_vocab_every=args.full_vocab_every,
    )
    print(json.dumps({k: record[k] for k in ("steps", "wall_time_s", "final_losses", "eval")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
