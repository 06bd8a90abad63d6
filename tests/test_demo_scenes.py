"""The synthetic scene corpus: determinism, captions, geometry, photo folders (no torch)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import Image, ImageOps

from cocatk.demo.scenes import (
    CLASS_NAMES,
    COLOURS,
    INVERSE_RELATION,
    MANIFEST_NAME,
    RELATIONS,
    SHAPES,
    distinct_meanings,
    iter_scenes,
    random_scene,
    render_scene,
    scene_rng,
    swap_objects,
)


def test_vocabulary_covers_the_brief():
    assert {"red", "green", "blue", "yellow", "white", "black"} <= set(COLOURS)
    assert {"circle", "square", "triangle"} <= set(SHAPES)
    assert set(RELATIONS) == {"left of", "right of", "above", "below"}
    assert len(CLASS_NAMES) == 18 and "green triangle" in CLASS_NAMES


def test_same_seed_same_scene_and_pixels():
    a = random_scene(scene_rng(7, 3))
    b = random_scene(scene_rng(7, 3))
    assert a == b
    assert np.array_equal(np.asarray(render_scene(a, 96)), np.asarray(render_scene(b, 96)))
    assert random_scene(scene_rng(7, 4)) != a
    assert [s.caption() for s in iter_scenes(1, 20)] == [s.caption() for s in iter_scenes(1, 20)]


def test_single_object_caption():
    spec = random_scene(random.Random(0), n_objects=1)
    assert spec.caption() == f"a {spec.objects[0].colour} {spec.objects[0].shape}"
    assert spec.captions() == [spec.caption()]
    with pytest.raises(ValueError):
        spec.swapped_caption()


def test_pair_captions_and_swap():
    for spec in iter_scenes(0, 50, n_objects=2):
        a, b = spec.objects
        assert spec.caption() == f"a {a.name} {spec.relation} a {b.name}"
        assert spec.caption(inverse=True) == f"a {b.name} {INVERSE_RELATION[spec.relation]} a {a.name}"
        assert spec.swapped_caption() == f"a {b.name} {spec.relation} a {a.name}"
        assert spec.swapped_caption() not in spec.captions()
        assert a.name != b.name
        # the swapped twin is what the swapped caption describes
        assert spec.swapped_caption() in swap_objects(spec).captions()


def test_example_wording():
    spec = next(s for s in iter_scenes(0, 500, n_objects=2) if s.relation == "left of")
    words = spec.caption().split()
    assert words[0] == "a" and words[3:5] == ["left", "of"] and words[5] == "a"


@pytest.mark.parametrize("relation", RELATIONS)
def test_geometry_matches_relation(relation):
    specs = [s for s in iter_scenes(3, 400, n_objects=2) if s.relation == relation][:30]
    assert specs
    for spec in specs:
        a, b = spec.objects
        dx, dy = b.x - a.x, b.y - a.y  # y grows downwards
        along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
        assert along >= (a.size + b.size) / 2  # apart along the relation's axis, no overlap
        assert abs(across) <= 0.36 * along  # and clearly on that axis
        for o in spec.objects:
            assert o.x - o.size / 2 >= 0.0 and o.x + o.size / 2 <= 1.0
            assert o.y - o.size / 2 >= 0.0 and o.y + o.size / 2 <= 1.0


def test_objects_contrast_with_background():
    for spec in iter_scenes(5, 200):
        for colour in spec.background.colours:
            for o in spec.objects:
                assert np.linalg.norm(np.subtract(colour, o.rgb)) >= 100


def test_render_sizes_and_object_colour_present():
    spec = random_scene(random.Random(2), n_objects=1)
    for size in (64, 200, (320, 240)):
        im = render_scene(spec, size)
        assert im.mode == "RGB" and im.size == (size, size) if isinstance(size, int) else im.size == size
    # the object's colour appears at its centre on a flat render
    im = np.asarray(render_scene(spec, 256)).astype(int)
    o = spec.objects[0]
    centre = im[int(o.y * 256), int(o.x * 256)]
    assert np.abs(centre - np.array(o.rgb)).max() <= 60


def test_variety_of_backgrounds_styles_and_counts():
    specs = list(iter_scenes(11, 300))
    assert {s.background.kind for s in specs} == {"flat", "gradient", "texture"}
    assert {o.style for s in specs for o in s.objects} == {"flat", "outline", "shaded"}
    assert {len(s.objects) for s in specs} == {1, 2}
    assert {s.relation for s in specs if s.relation} == set(RELATIONS)


def test_unique_scenes_have_distinct_meanings():
    keys = [s.key() for s in iter_scenes(0, 150, n_objects=2, unique=True)]
    assert len(keys) == len(set(keys)) == 150


def test_distinct_meanings_is_exact_and_bounds_unique_streams():
    # Every meaning, enumerated: 18 single objects; ordered pairs of different objects x relations, where
    # "A left of B" and "B right of A" are one meaning.
    pairs = {
        min(f"a {a} {r} a {b}", f"a {b} {INVERSE_RELATION[r]} a {a}")
        for a in CLASS_NAMES
        for b in CLASS_NAMES
        if a != b
        for r in RELATIONS
    }
    assert distinct_meanings(1) == len(CLASS_NAMES) == 18
    assert distinct_meanings(2) == len(pairs) == 612
    assert distinct_meanings() == 630
    # The whole one-object space can be drawn; one more would loop forever, so it is refused up front.
    assert len({s.key() for s in iter_scenes(0, 18, n_objects=1, unique=True)}) == 18
    with pytest.raises(ValueError, match="at most 18"):
        next(iter_scenes(0, 19, n_objects=1, unique=True))
    with pytest.raises(ValueError, match="at most 630"):
        iter_scenes(0, 631, unique=True)  # refused when called, not at the first next()
    assert len(list(iter_scenes(0, 631))) == 631  # repeats allowed without unique


def test_generate_folder_refuses_more_than_the_scene_space_before_writing(tmp_path):
    from cocatk.demo.scenes import generate_folder

    with pytest.raises(ValueError, match="at most 630"):
        generate_folder(tmp_path / "photos", n=631)
    assert not (tmp_path / "photos").exists()


def test_cli_photo_limit_matches_the_scene_space():
    from cocatk.cli.demo import MAX_PHOTOS

    assert distinct_meanings() == MAX_PHOTOS


def test_generate_folder(tmp_path):
    from cocatk.demo.scenes import generate_folder

    records = generate_folder(tmp_path, n=12, seed=4, exif_fraction=0.5, broken=True, min_size=64, max_size=160)
    photos = [r for r in records if "broken" not in r]
    assert len(photos) == 12 and len(records) == 15
    manifest = [json.loads(line) for line in (tmp_path / MANIFEST_NAME).read_text().splitlines()]
    assert manifest == records
    rotated = [r for r in photos if r["orientation"]]
    assert rotated, "exif_fraction=0.5 should rotate some of 12 photos"
    for r in photos:
        with Image.open(tmp_path / r["file"]) as im:
            upright = ImageOps.exif_transpose(im)
            assert upright.size == (r["width"], r["height"])
    assert {p.suffix for p in tmp_path.iterdir()} >= {".jpg", ".png", ".jsonl"}
    assert (tmp_path / "broken_empty.jpg").stat().st_size == 0
    for name in ("broken_empty.jpg", "broken_truncated.jpg", "broken_text.jpg"):
        with pytest.raises(OSError), Image.open(tmp_path / name) as im:
            im.load()
    # same seed, same files
    again = generate_folder(tmp_path / "again", n=12, seed=4, exif_fraction=0.5, broken=True, min_size=64, max_size=160)
    assert again == records
    assert (tmp_path / "scene_0000.jpg").read_bytes() == (tmp_path / "again" / "scene_0000.jpg").read_bytes() or (
        tmp_path / "scene_0000.png"
    ).exists()


def test_exif_rotation_restores_the_scene(tmp_path):
    from cocatk.demo.scenes import _save

    spec = random_scene(random.Random(9), n_objects=2)
    upright = render_scene(spec, (300, 200))
    for orientation in (3, 6, 8):
        path = tmp_path / f"o{orientation}.jpg"
        _save(upright, path, "JPEG", orientation)
        with Image.open(path) as im:
            assert im.getexif()[0x0112] == orientation
            restored = np.asarray(ImageOps.exif_transpose(im)).astype(int)
        assert restored.shape == (200, 300, 3)
        assert np.abs(restored - np.asarray(upright).astype(int)).mean() < 4
