"""Quality of a CoCa model on held-out synthetic scenes: zero-shot colour-shape classes, text->image retrieval, and
the compositional test that motivates reranking by caption likelihood.

The training script (:mod:`cocatk.demo.train`) records these numbers for the shipped ``demo`` model and
``tests/test_demo_quality.py`` checks them against thresholds.

Example:
    >>> from cocatk import load_model
    >>> report = evaluate(load_model("demo", device="cpu"), n_single=90, n_pairs=60)   # doctest: +SKIP
    >>> report["zeroshot_acc"] > 0.5                                                   # doctest: +SKIP
    True
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .scenes import CLASS_NAMES, SceneSpec, iter_scenes, render_scene

if TYPE_CHECKING:  # pragma: no cover
    from ..models import CocaModel

#: Scene stream of the held-out evaluation; training draws from other streams (namespace "train").
EVAL_SEED = 20240607
#: Evaluation photos are drawn this large and go through the model's own preprocessing (resize + centre crop), as
#: user photos do.
EVAL_IMAGE_SIZE = 192


def eval_scenes(n_single: int, n_pairs: int, seed: int = EVAL_SEED) -> tuple[list[SceneSpec], list[SceneSpec]]:
    """Held-out one-object scenes and two-object scenes with distinct meanings (one true image per caption)."""
    single = list(iter_scenes(seed, n_single, n_objects=1, namespace="eval-single"))
    pairs = list(iter_scenes(seed, n_pairs, n_objects=2, unique=True, namespace="eval-pair"))
    return single, pairs


def evaluate(
    model: CocaModel,
    n_single: int = 360,
    n_pairs: int = 200,
    rerank_k: int = 10,
    seed: int = EVAL_SEED,
    image_size: int = EVAL_IMAGE_SIZE,
) -> dict[str, Any]:
    """Measure a model on held-out scenes.

    Args:
        model: a loaded :class:`~cocatk.models.CocaModel`.
        n_single: one-object scenes for zero-shot classification over the 18 classes "a {colour} {shape}".
        n_pairs: two-object scenes for text->image retrieval (each caption has one matching image) and the swap test.
        rerank_k: contrastive candidates that caption likelihood reranks.
        seed: scene stream (keep the default: it is disjoint from training).
        image_size: side of the rendered scenes before the model's preprocessing.

    Returns:
        ``zeroshot_acc`` (chance 1/18), ``t2i_r1`` and ``t2i_r{k}`` (contrastive), ``t2i_r1_rerank`` (top-k reranked
        by caption likelihood), ``swap_pref_contrastive`` and ``swap_pref_loglik``: how often the true caption
        beats the swapped one ("a blue square left of a red circle" for "a red circle left of a blue square") for its
        own image by cosine similarity and by caption log-likelihood; ``caption_loglik_mean``, the mean
        log p(true caption | its image) of the two-object scenes, summed over the caption's tokens, in nats, with
        the softmax over the whole vocabulary (0 for a perfect captioner); plus the counts.
    """
    single, pairs = eval_scenes(n_single, n_pairs, seed)
    report: dict[str, Any] = {"seed": seed, "n_single": len(single), "n_pairs": len(pairs), "rerank_k": rerank_k}

    if single:
        classes = [f"a {name}" for name in CLASS_NAMES]
        w = model.encode_texts(classes)
        emb = model.encode_images([render_scene(s, image_size) for s in single])
        pred = (emb @ w.T).argmax(axis=1)
        truth = np.array([CLASS_NAMES.index(s.objects[0].name) for s in single])
        report["zeroshot_acc"] = float((pred == truth).mean())
        report["zeroshot_chance"] = 1.0 / len(CLASS_NAMES)

    if pairs:
        captions = [s.caption() for s in pairs]
        swapped = [s.swapped_caption() for s in pairs]
        img, tokens = model.encode_images_and_tokens([render_scene(s, image_size) for s in pairs])
        assert tokens is not None
        txt = model.encode_texts(captions)
        txt_swapped = model.encode_texts(swapped)
        sim = txt @ img.T  # (queries, images); query i's image is i
        order = np.argsort(-sim, axis=1, kind="stable")
        target = np.arange(len(pairs))
        k = min(rerank_k, len(pairs))
        report["t2i_r1"] = float((order[:, 0] == target).mean())
        report[f"t2i_r{k}"] = float((order[:, :k] == target[:, None]).any(axis=1).mean())
        reranked = []
        for i, caption in enumerate(captions):
            cand = order[i, :k]
            ll = model.caption_loglik(caption, tokens[cand])
            reranked.append(int(cand[int(np.argmax(ll))]))
        report["t2i_r1_rerank"] = float((np.array(reranked) == target).mean())

        own = np.einsum("nd,nd->n", img, txt)
        own_swapped = np.einsum("nd,nd->n", img, txt_swapped)
        report["swap_pref_contrastive"] = float((own > own_swapped).mean())
        ll_true = np.array([model.caption_loglik(c, tokens[i : i + 1])[0] for i, c in enumerate(captions)])
        ll_swap = np.array([model.caption_loglik(c, tokens[i : i + 1])[0] for i, c in enumerate(swapped)])
        report["swap_pref_loglik"] = float((ll_true > ll_swap).mean())
        report["caption_loglik_mean"] = float(ll_true.mean())
    return report
