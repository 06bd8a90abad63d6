"""The demo model's training pieces: hard-negative twins, deterministic batches, the trimmed CoCa forward."""

from __future__ import annotations

import random

import pytest

from cocatk.demo.scenes import SHAPES, iter_scenes, reshape_object


def test_reshape_object_changes_one_shape_word_and_keeps_objects_distinct():
    rng = random.Random(0)
    for spec in iter_scenes(3, 200):
        twin = reshape_object(spec, rng)
        assert twin.background == spec.background and twin.relation == spec.relation
        changed = [(a, b) for a, b in zip(spec.objects, twin.objects, strict=True) if a != b]
        assert len(changed) == 1
        a, b = changed[0]
        assert (a.colour, a.x, a.y, a.size, a.style, a.rgb) == (b.colour, b.x, b.y, b.size, b.style, b.rgb)
        assert a.shape != b.shape and b.shape in SHAPES
        assert len({o.name for o in twin.objects}) == len(twin.objects)
        diff = [(u, v) for u, v in zip(spec.caption().split(), twin.caption().split(), strict=True) if u != v]
        assert diff == [(a.shape, b.shape)]


def test_hard_negative_twins_follow_their_scene_in_a_batch():
    from cocatk.demo.scenes import swap_objects
    from cocatk.demo.train import hard_negative

    rng = random.Random(1)
    kinds = {"swap": 0, "shape": 0}
    for spec in iter_scenes(4, 200, n_objects=2):
        twin = hard_negative(spec, rng)
        kinds["swap" if twin == swap_objects(spec) else "shape"] += 1
        assert set(twin.captions()).isdisjoint(spec.captions())
    assert kinds["swap"] > 50 and kinds["shape"] > 50


@pytest.fixture(scope="module")
def demo_arch(tmp_path_factory):
    import json

    from cocatk.demo.train import ARCH, CONFIG, build_model

    path = tmp_path_factory.mktemp("arch") / f"{ARCH}.json"
    path.write_text(json.dumps(CONFIG))
    return build_model(0, path)


def test_scene_batches_are_deterministic_and_hold_twins(demo_arch):
    import torch

    from cocatk.demo.train import SceneBatches

    _, preprocess, tokenizer = demo_arch
    a = SceneBatches(0, 16, 3, 64, preprocess, tokenizer, twin_share=1.0)
    b = SceneBatches(0, 16, 3, 64, preprocess, tokenizer, twin_share=1.0)
    (xa, ia), (xb, ib) = a[2], b[2]
    assert xa.shape == (16, 3, 64, 64) and ia.shape == (16, 16)
    assert torch.equal(xa, xb) and torch.equal(ia, ib)
    assert not torch.equal(a[1][0], xa)
    # with every scene twinned, slots 2k and 2k+1 hold a scene and its hard-negative twin: different captions
    for k in range(0, 16, 2):
        assert not torch.equal(ia[k], ia[k + 1])


def test_trimmed_forward_gives_open_clips_coca_loss(demo_arch):
    """coca_forward runs the decoder only up to the longest caption: the CoCaLoss terms equal CoCa.forward's."""
    import torch
    from open_clip.loss import CoCaLoss

    from cocatk.demo.train import SceneBatches, coca_forward

    model, preprocess, tokenizer = demo_arch
    images, ids = SceneBatches(0, 12, 1, 64, preprocess, tokenizer)[0]
    assert (ids == 0).any()  # padding is there to trim
    loss = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=0)
    with torch.no_grad():
        full = model(images, ids)
        trimmed = coca_forward(model, images, ids)
        ref, got = loss(**full, output_dict=True), loss(**trimmed, output_dict=True)
    assert trimmed["logits"].shape[1] < full["logits"].shape[1]
    n = trimmed["logits"].shape[1]
    assert torch.allclose(trimmed["logits"], full["logits"][:, :n], atol=1e-5)
    for key in ("contrastive_loss", "caption_loss"):
        assert abs(ref[key].item() - got[key].item()) < 1e-5, key


def test_scene_labels_match_the_captions(demo_arch):
    from cocatk.demo.scenes import CLASS_NAMES, RELATIONS
    from cocatk.demo.train import SceneBatches, scene_labels

    _, preprocess, tokenizer = demo_arch
    _, scenes = SceneBatches(5, 64, 1, 64, preprocess, tokenizer).draw(0)
    present, first, relation = scene_labels(scenes)
    assert present.shape == (64, 18) and relation.shape == (64,)
    for (spec, inverse), p, f, r in zip(scenes, present, first.tolist(), relation.tolist(), strict=True):
        assert sorted(CLASS_NAMES[i] for i in p.nonzero()[:, 0].tolist()) == sorted(o.name for o in spec.objects)
        if len(spec.objects) == 1:
            assert r == -1 and CLASS_NAMES[f] == spec.objects[0].name
        else:  # "a {first} {relation} a {other}" is the caption the CoCa stage is given for this scene
            assert spec.caption(inverse=inverse) == f"a {CLASS_NAMES[f]} {RELATIONS[r]} a " + next(
                o.name for o in spec.objects if o.name != CLASS_NAMES[f]
            )


def test_corpus_vocab_forward_is_the_full_layer_restricted_to_the_captions_words(demo_arch):
    """coca_forward(vocab=...) evaluates the output layer for the corpus's ids only: its logits are the full logits
    at those ids, its labels index them, and CoCaLoss on it is the cross-entropy of the softmax over those ids."""
    import torch
    import torch.nn.functional as F
    from open_clip.loss import CoCaLoss

    from cocatk.demo.scenes import COLOURS, RELATIONS, SHAPES
    from cocatk.demo.train import SceneBatches, coca_forward, corpus_vocab

    model, preprocess, tokenizer = demo_arch
    vocab = corpus_vocab(tokenizer)
    # padding first, then every id of every word a caption can use, start and end of text included
    words = ["a", *COLOURS, *SHAPES, *" ".join(RELATIONS).split()]
    expected = {0, 49406, 49407} | {int(t) for w in words for t in tokenizer([w])[0] if t not in (0, 49406, 49407)}
    assert vocab[0] == 0 and vocab.tolist() == sorted(expected) and len(vocab) == 18
    images, ids = SceneBatches(2, 12, 1, 64, preprocess, tokenizer)[0]
    loss = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=0)
    with torch.no_grad():
        full = coca_forward(model, images, ids)
        small = coca_forward(model, images, ids, vocab=vocab)
        got = loss(**small, output_dict=True)
    assert small["logits"].shape[-1] == 18
    assert torch.allclose(small["logits"], full["logits"][..., vocab], atol=1e-5)
    assert torch.equal(vocab[small["labels"]], full["labels"])
    logits, labels = full["logits"][..., vocab], small["labels"]
    ref = F.cross_entropy(logits.permute(0, 2, 1), labels, ignore_index=0)
    assert abs(got["caption_loss"].item() - 2.0 * ref.item()) < 1e-5
    assert model.text_decoder.text_projection is not None  # put back after the restricted forward
