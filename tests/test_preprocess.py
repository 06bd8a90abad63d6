"""cocatk.preprocess against open_clip's own transforms, and the Ray decode task + actor pieces that use it.

The reference is open_clip's inference transform (``open_clip.image_transform``): the PIL half plus the torch half
must equal it bit for bit. The Ray pieces run here in-process, without Ray: a decode task is a plain function and an
actor a plain class.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cocatk.preprocess import describe, normalize, resize_crop
from tests.test_index import TINY, make_images

#: Every case the geometry distinguishes: 1x1, exactly the output, one pixel off either way, portrait and landscape,
#: odd sizes whose crop offsets round, extreme aspect ratios, images larger and smaller than the output.
SHAPES = [(1, 1), (224, 224), (225, 224), (224, 225), (640, 480), (480, 640), (223, 500), (500, 223), (3, 1000),
          (1000, 3), (257, 255), (1024, 768), (77, 99), (120, 119)]  # fmt: skip


def _image(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).convert(mode)


@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_the_two_halves_equal_open_clip_transform_bit_for_bit(resize_mode: str, interpolation: str) -> None:
    import open_clip

    transform = open_clip.image_transform(
        224,
        is_train=False,
        resize_mode=resize_mode,
        interpolation=interpolation,
        mean=(0.1, 0.2, 0.3),
        std=(0.4, 0.5, 0.6),
    )
    spec = describe(transform)
    assert spec is not None and spec["resize"] == resize_mode and spec["interpolation"] == interpolation
    assert spec["mean"] == pytest.approx([0.1, 0.2, 0.3]) and spec["std"] == pytest.approx([0.4, 0.5, 0.6])
    images = [_image(w, h, i) for i, (w, h) in enumerate(SHAPES)]
    images += [_image(300, 200, 99, "L"), _image(200, 300, 98, "P"), _image(250, 250, 97, "RGBA")]
    for im in images:
        pixels = resize_crop(im, spec)
        assert pixels.dtype == np.uint8 and pixels.shape == (224, 224, 3) and pixels.flags.writeable
        assert torch.equal(normalize(pixels[None], spec)[0], transform(im)), (im.size, im.mode)
    # a batch is normalised as its images one by one
    batch = np.stack([resize_crop(im, spec) for im in images[:5]])
    assert torch.equal(normalize(batch, spec), torch.stack([transform(im) for im in images[:5]]))


def test_describe_gives_none_for_any_other_transform() -> None:
    import open_clip
    from torchvision import transforms as T

    assert describe(open_clip.image_transform(224, is_train=False, resize_mode="longest")) is None
    assert describe(open_clip.image_transform((224, 256), is_train=False)) is None  # not square
    assert describe(open_clip.image_transform(224, is_train=True)) is None  # training augmentation
    standard = open_clip.image_transform(224, is_train=False)
    assert describe(T.Compose([*standard.transforms[:-1], T.Grayscale(3), standard.transforms[-1]])) is None
    assert describe(T.Compose(standard.transforms[1:])) is None  # no resize
    assert describe(lambda im: im) is None
    assert describe(standard) is not None


@pytest.mark.parametrize(
    ("arch", "tag"), [("ViT-B-16-SigLIP", "webli"), ("coca_ViT-B-32", "laion2b_s13b_b90k"), ("ViT-B-32", "openai")]
)
def test_meta_model_applies_the_weights_own_preprocessing(arch: str, tag: str) -> None:
    """No weights are read: the preprocessing of a tag comes from open_clip's table (SigLIP: mean/std 0.5, squash),
    which the Ray decode tasks must apply as load_model does."""
    import open_clip

    from cocatk.models import meta_model

    model, transform, size = meta_model(arch, tag)
    assert next(model.parameters()).is_meta and size == 224
    want = open_clip.get_pretrained_cfg(arch, tag)
    spec = describe(transform)
    assert spec is not None
    assert spec["mean"] == pytest.approx(list(want.get("mean", open_clip.OPENAI_DATASET_MEAN)))
    assert spec["std"] == pytest.approx(list(want.get("std", open_clip.OPENAI_DATASET_STD)))
    assert spec["resize"] == want.get("resize_mode", "shortest")


def _decode(paths: list[Path], pixels, size: int) -> dict:
    from cocatk.retrieval.ray_encoder import _decode_batch

    batch = {
        "pos": np.arange(len(paths)),
        "path": np.array([str(p).encode() for p in paths], dtype=object),
        "offset": np.full(len(paths), -1),  # whole files (an item of a shard has its byte range here)
        "size": np.full(len(paths), -1),
        "field": np.array([""] * len(paths), dtype=object),  # a table's image column for a row
        "need_decode": np.ones(len(paths), dtype=bool),
    }
    return _decode_batch(batch, pixels=pixels, draft=size, max_megapixels=None, known_ref=None)


def test_decode_task_and_actor_give_the_local_embeddings(tmp_path: Path) -> None:
    """The torch-free decode (uint8, normalised by the actor) and the fallback (the transform itself, float32) both
    give the embeddings of the local path: load_image, the model's preprocess, encode_images."""
    from cocatk.images import load_image
    from cocatk.models import load_model

    paths = make_images(tmp_path / "p", 6)
    (tmp_path / "p" / "bad.jpg").write_bytes(b"not an image")
    paths.append(tmp_path / "p" / "bad.jpg")
    model = load_model(TINY, "none", device="cpu")
    want = model.encode_images(
        torch.stack([model.preprocess(load_image(p, draft_size=model.image_size)) for p in paths[:-1]])
    )
    spec = describe(model.preprocess)
    assert spec is not None
    threads = torch.get_num_threads()  # an actor sets its process's torch threads
    try:
        _decode_and_embed(paths, model, spec, np.asarray(want))
    finally:
        torch.set_num_threads(threads)


def _decode_and_embed(paths: list[Path], model, spec: dict, want: np.ndarray) -> None:
    from cocatk.images import load_image
    from cocatk.retrieval.ray_encoder import _EmbedActor

    reference = torch.stack([model.preprocess(load_image(p, draft_size=model.image_size)) for p in paths[:-1]])
    for pixels, norm in ((spec, spec), (model.preprocess, None)):
        out = _decode(paths, pixels, model.image_size)
        s = model.image_size
        shipped = [np.frombuffer(b, np.uint8 if norm else np.float32) for b in out["pixels"][:-1]]
        if norm:  # the model's input, bit for bit: what the actor builds from the uint8 pixels
            x = normalize(np.stack([b.reshape(s, s, 3) for b in shipped]), spec)
        else:
            x = torch.from_numpy(np.stack([b.reshape(3, s, s) for b in shipped]))
        assert torch.equal(x, reference)
        assert out["reason"][-1] == "not an image" and out["pixels"][-1] == b""
        per_image = model.image_size**2 * 3 * (1 if norm else 4)
        assert all(len(b) == per_image for b in out["pixels"][:-1])
        actor = _EmbedActor(TINY, "none", "cpu", None, tokens=False, threads=1, norm=norm)
        res = actor(dict(out))
        got = np.stack([np.frombuffer(e, np.float32) for e in res["embedding"][:-1]])
        assert np.abs(got - want).max() <= 1e-5
        assert res["embedding"][-1] == b""


def test_a_decode_task_imports_neither_torch_nor_open_clip(tmp_path: Path) -> None:
    paths = make_images(tmp_path / "p", 3)
    spec = {
        "resize": "shortest",
        "size": 32,
        "crop": True,
        "interpolation": "bicubic",
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
    }
    code = (
        "import sys\nimport numpy as np\nfrom cocatk.retrieval.ray_encoder import _decode_batch\n"
        f"paths = {[str(p) for p in paths]!r}\n"
        "b = {'pos': np.arange(3), 'path': np.array([p.encode() for p in paths], dtype=object),"
        " 'offset': np.full(3, -1), 'size': np.full(3, -1), 'field': np.array(['']*3, dtype=object),"
        " 'need_decode': np.ones(3, dtype=bool)}\n"
        f"out = _decode_batch(b, pixels={spec!r}, draft=32, max_megapixels=None, known_ref=None)\n"
        "assert [len(x) for x in out['pixels']] == [32 * 32 * 3] * 3, out\n"
        "print('HEAVY', [m for m in ('torch', 'torchvision', 'open_clip') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out, out
