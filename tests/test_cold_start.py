"""Cold start: a model built without parameter init and loaded from a memory-mapped checkpoint equals the plain
open_clip build + ``load_checkpoint`` bit for bit; the command line leaves out open_clip's optional imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA, TINY_CONFIG
from PIL import Image

import cocatk
from cocatk import models
from cocatk.errors import ModelConfigError
from cocatk.models import loading, registry

CLIP_TINY = DATA / "clip_tiny.json"
SIGMOID_TINY = DATA / "sigmoid_tiny.json"
TEXTS = ["a photo of a dog", "a red bicycle leaning on a wall", "x"]


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40 + 7 * i, 50, 3), dtype=np.uint8)) for i in range(n)]


def _save(model: torch.nn.Module, path: Path, dtype: torch.dtype | None = None, legacy: bool = False) -> Path:
    """A checkpoint of ``model``: safetensors by suffix, else torch.save (zip, or the legacy format)."""
    sd = {
        k: (v.to(dtype) if dtype and v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()
    }
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    return path


def _reference(spec: models.ModelSpec, path: str) -> torch.nn.Module:
    """The previous build: open_clip builds and initialises under the seed, then copies the checkpoint in."""
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(models.RANDOM_SEED)
        model, _, _ = open_clip.create_model_and_transforms(spec.arch, pretrained=None, device="cpu")
    open_clip.load_checkpoint(model, path, strict=True, weights_only=True)
    return model.eval()


_LOAD = loading._load_checkpoint


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _assert_same(got: cocatk.CocaModel, ref_model: torch.nn.Module, bf16: bool = False) -> None:
    """Every parameter and buffer (persistent or not), and the encoders' outputs, bit for bit."""
    if bf16:
        models.bf16_island(ref_model.visual)
    a, b = _tensors(got.model), _tensors(ref_model)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].stride() == b[name].stride(), name
        assert torch.equal(a[name], b[name]), name
    ref = type(got)(
        spec=got.spec,
        model=ref_model,
        preprocess=got.preprocess,
        tokenizer=got.tokenizer,
        device="cpu",
        precision=got.precision,
    )
    if bf16:
        ref.__dict__["_visual_bf16"] = True  # made an island above
    images = _images(3)
    assert np.array_equal(got.encode_images(images), ref.encode_images(images))
    assert np.array_equal(got.encode_texts(TEXTS), ref.encode_texts(TEXTS))
    if got.has_decoder:
        assert torch.equal(got.image_tokens(images), ref.image_tokens(images))


#: A CLIP with a timm image tower (timm's own tiny test ViT): timm initialises with its own functions.
TIMM_TINY = {
    "embed_dim": 32,
    "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False, "image_size": 160},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def timm_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("configs") / "timm_tiny.json"
    path.write_text(json.dumps(TIMM_TINY))
    return path


@pytest.mark.parametrize(
    "config", [TINY_CONFIG, CLIP_TINY, SIGMOID_TINY, "timm"], ids=["coca", "clip", "siglip", "timm"]
)
@pytest.mark.parametrize("suffix", [".safetensors", ".bin", ".pt"])
def test_mapped_load_equals_open_clip_load(tmp_path, monkeypatch, request, config, suffix):
    import open_clip

    if config == "timm":
        config = request.getfixturevalue("timm_config")
    random = cocatk.load_model(str(config), "none", device="cpu", precision="fp32")
    path = _save(random.model, tmp_path / f"weights{suffix}")
    calls = []
    monkeypatch.setattr(loading, "_load_checkpoint", lambda *a: calls.append(a) or _LOAD(*a))
    monkeypatch.setattr(open_clip, "load_checkpoint", None)  # the previous loader is not used
    got = cocatk.load_model(str(config), str(path), device="cpu", precision="fp32")
    monkeypatch.undo()
    assert len(calls) == 1
    assert got.model is not random.model
    _assert_same(got, _reference(got.spec, str(path)))
    # Nothing was left to chance: the weights are the file's, not a re-seeded init.
    assert torch.equal(got.model.logit_scale, random.model.logit_scale)


def test_mapped_load_of_the_demo_preset_equals_open_clip_load():
    got = cocatk.load_model("demo", device="cpu", precision="fp32")
    _assert_same(got, _reference(got.spec, got.spec.pretrained))


def test_mapped_load_in_bf16_equals_open_clip_load(tmp_path):
    random = cocatk.load_model(str(TINY_CONFIG), "none", device="cpu", precision="fp32")
    path = _save(random.model, tmp_path / "weights.safetensors")
    got = cocatk.load_model(str(TINY_CONFIG), str(path), device="cpu", precision="bf16")
    assert got.cpu_bf16 and got.model.visual.conv1.weight.dtype == torch.float32  # cast at first use, not at load
    got._image_tower_ready()
    assert got.model.visual.conv1.weight.dtype == torch.bfloat16
    _assert_same(got, _reference(got.spec, str(path)), bf16=True)


@pytest.mark.parametrize(
    ("name", "dtype", "legacy"),
    [("fp16.safetensors", torch.float16, False), ("bf16.bin", torch.bfloat16, False), ("legacy.pt", None, True)],
)
def test_other_dtypes_and_the_legacy_format(tmp_path, name, dtype, legacy):
    """A half-precision checkpoint is cast into fp32 parameters like a copy would; a pre-zip torch.save file, which
    cannot be mapped, is read."""
    random = cocatk.load_model(str(TINY_CONFIG), "none", device="cpu", precision="fp32")
    path = _save(random.model, tmp_path / name, dtype=dtype, legacy=legacy)
    got = cocatk.load_model(str(TINY_CONFIG), str(path), device="cpu", precision="fp32")
    assert got.model.text.token_embedding.weight.dtype == torch.float32
    _assert_same(got, _reference(got.spec, str(path)))


def test_noncontiguous_tensor_in_a_checkpoint(tmp_path):
    random = cocatk.load_model(str(TINY_CONFIG), "none", device="cpu", precision="fp32")
    sd = dict(random.model.state_dict())
    key = "text.text_projection"
    sd[key] = sd[key].t().contiguous().t()  # same values, column-major
    assert not sd[key].is_contiguous()
    path = tmp_path / "strided.pt"
    torch.save(sd, path)
    got = cocatk.load_model(str(TINY_CONFIG), str(path), device="cpu", precision="fp32")
    assert got.model.text.text_projection.is_contiguous()
    _assert_same(got, _reference(got.spec, str(path)))


def _old_error(path: Path) -> str:
    """The one line the previous build gave: ModelConfigError around open_clip.load_checkpoint's first line."""
    spec = models.resolve_model(str(TINY_CONFIG), str(path))
    try:
        _reference(spec, str(path))
    except Exception as e:
        return f"checkpoint {path} does not fit {spec.arch}: {str(e).splitlines()[0][:200]}"
    raise AssertionError("the checkpoint fits")


def test_a_checkpoint_that_does_not_fit_is_the_same_one_line_error(tmp_path):
    clip = cocatk.load_model(str(CLIP_TINY), "none", device="cpu", precision="fp32")
    coca = cocatk.load_model(str(TINY_CONFIG), "none", device="cpu", precision="fp32")
    bad = {**coca.model.state_dict(), "text.text_projection": torch.zeros(3, 3)}
    torch.save(bad, tmp_path / "shape.pt")
    (tmp_path / "garbage.safetensors").write_bytes(b"not a checkpoint")
    cases = [_save(clip.model, tmp_path / "clip.safetensors"), tmp_path / "shape.pt", tmp_path / "garbage.safetensors"]
    for path in cases:
        with pytest.raises(ModelConfigError) as e:
            cocatk.load_model(str(TINY_CONFIG), str(path), device="cpu")
        assert e.value.message == _old_error(path)
        assert "\n" not in str(e.value) and "--model" in e.value.hint


def test_skip_init_leaves_buffers_and_plain_tensors_alone():
    mode = loading._skip_param_init()
    param = torch.nn.Parameter(torch.zeros(3))
    with mode:
        torch.nn.init.normal_(param)
        torch.nn.init.trunc_normal_(param)
        param.uniform_()
        assert torch.equal(param, torch.zeros(3))  # parameters are left as they are
        lin = torch.nn.Linear(4, 4)
        mask = torch.empty(3, 3).fill_(float("-inf")).triu_(1)  # how open_clip builds its attention masks
        plain = torch.zeros(2).add_(1)
    assert torch.equal(mask, torch.full((3, 3), float("-inf")).triu(1))
    assert torch.equal(plain, torch.ones(2))
    assert isinstance(lin.weight, torch.nn.Parameter)
    # Outside the mode, init runs again.
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 4).weight.detach().clone()
    torch.manual_seed(0)
    assert torch.equal(torch.nn.Linear(4, 4).weight, a)


def test_random_weights_are_unchanged_by_the_mapped_path(tmp_path):
    """--pretrained none keeps the seeded init: the same weights as open_clip's own build under the seed."""
    import open_clip

    got = cocatk.load_model(str(TINY_CONFIG), "none", device="cpu", precision="fp32")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(models.RANDOM_SEED)
        ref, _, _ = open_clip.create_model_and_transforms(got.spec.arch, pretrained=None, device="cpu")
        loading._init_decoder_projection(ref)
    a, b = _tensors(got.model), _tensors(ref)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_a_command_line_search_leaves_out_transformers_and_timm(tmp_path):
    """A real `cocatk search` process (main() without argv) imports neither; the hits equal the library's."""
    from cocatk.cli import main
    from cocatk.demo.scenes import generate_folder

    random = cocatk.load_model(str(TINY_CONFIG), "none", device="cpu", precision="fp32")
    weights = _save(random.model, tmp_path / "w.safetensors")
    generate_folder(tmp_path / "photos", n=6, manifest=False)
    index = tmp_path / "index"
    common = ["--index", str(index)]
    model_args = ["--model", str(TINY_CONFIG), "--pretrained", str(weights)]
    assert main(["index", str(tmp_path / "photos"), *common, *model_args, "--device", "cpu"]) == 0
    code = (
        "import json, sys\n"
        "from cocatk.cli import main\n"
        f"sys.argv = ['cocatk', 'search', 'a red square', '--index', {str(index)!r}, '--json', '--no-rerank',"
        " '--device', 'cpu']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print(json.dumps([m for m in ('transformers', 'timm') if m in sys.modules]))\n"
    )
    lines = _run(code).strip().splitlines()
    assert json.loads(lines[-1]) == []
    hits = json.loads("\n".join(lines[:-1]))["hits"]
    from cocatk.retrieval import Index
    from cocatk.retrieval.search import search_index

    with Index.open(index, device="cpu") as idx:
        ref = search_index(idx, text="a red square", rerank=False).to_dict()["hits"]
    assert len(hits) == 6 and [(h["path"], h["similarity"]) for h in hits] == [
        (h["path"], h["similarity"]) for h in ref
    ]


def test_deferred_extras_come_back_for_a_model_that_needs_them(tmp_path):
    """After a lean import, a timm image tower still builds, equal to a normal process's, and open_clip's classes
    keep their identity."""
    path = tmp_path / "timm_tiny.json"
    path.write_text(json.dumps(TIMM_TINY))
    code = (
        "import sys, json\n"
        "from cocatk._imports import defer_optional_imports, deferred\n"
        "defer_optional_imports()\n"
        "import open_clip\n"
        "lean = sorted(deferred())\n"
        "assert 'timm' not in sys.modules and 'transformers' not in sys.modules, lean\n"
        "old_timm_model, old_hf = open_clip.model.TimmModel, open_clip.model.HFTextEncoder\n"
        "import cocatk\n"
        f"m = cocatk.load_model({str(path)!r}, 'none', device='cpu', precision='fp32')\n"
        "import open_clip.timm_model as tm, open_clip.hf_model as hm\n"
        "assert tm.timm is not None and tm.TimmModel is old_timm_model\n"
        "assert isinstance(m.model.visual, open_clip.timm_model.TimmModel)\n"
        "assert hm.transformers is None and 'transformers' not in sys.modules  # not needed by this model\n"
        "from cocatk._imports import ensure_open_clip_extras\n"
        "old_coca = open_clip.CoCa\n"
        "ensure_open_clip_extras()  # everything back\n"
        "assert hm.transformers is not None and hm.HFTextEncoder is old_hf and not deferred()\n"
        "assert open_clip.coca_model.CoCa is old_coca and open_clip.model.HFTextEncoder is old_hf\n"
        "print(json.dumps({'lean': lean, 'emb': m.encode_texts(['a dog']).tolist()}))\n"
    )
    out = json.loads(_run(code).strip().splitlines()[-1])
    assert "open_clip.timm_model" in out["lean"] and "open_clip.hf_model" in out["lean"]
    here = cocatk.load_model(str(path), "none", device="cpu", precision="fp32")
    assert np.array_equal(np.asarray(out["emb"], np.float32), here.encode_texts(["a dog"]))


def test_library_imports_are_untouched():
    """Importing cocatk and loading a model as a library leaves open_clip whole."""
    code = (
        "import cocatk, sys\n"
        f"cocatk.load_model({str(TINY_CONFIG)!r}, 'none', device='cpu')\n"
        "from cocatk._imports import deferred\n"
        "import open_clip.hf_model as hm\n"
        "print(sorted(deferred()), hm.transformers is not None)\n"
    )
    assert _run(code).strip().splitlines()[-1] == "[] True"


def test_weights_digest_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    import os

    from cocatk import config

    path = tmp_path / "big.bin"
    path.write_bytes(b"a" * models.DIGEST_CACHE_MIN_BYTES)
    calls = []
    real = registry._sha256_file
    monkeypatch.setattr(registry, "_sha256_file", lambda p: calls.append(p) or real(p))
    spec = models.resolve_model(str(TINY_CONFIG), str(path))
    first = spec.weights_id()
    assert first == "sha256:" + real(path) and len(calls) == 1
    assert spec.weights_id() == first and len(calls) == 2  # written just now: not remembered yet (could change
    # again within the same timestamp tick)

    monkeypatch.setattr(registry, "_DIGEST_SETTLE_NS", 0)
    assert spec.weights_id() == first and len(calls) == 3
    assert spec.weights_id() == first and len(calls) == 3  # remembered
    assert (config.cache_dir() / "file-digests.json").is_file()
    mtime = path.stat().st_mtime_ns
    with open(path, "r+b") as f:  # same size, and the mtime put back: the ctime still moves
        f.write(b"b")
    os.utime(path, ns=(mtime, mtime))
    changed = spec.weights_id()
    assert changed != first and changed == "sha256:" + real(path) and len(calls) == 4
    (config.cache_dir() / "file-digests.json").write_text("{not json")
    assert spec.weights_id() == changed and len(calls) == 5  # a corrupt cache is ignored, then rewritten
    assert spec.weights_id() == changed and len(calls) == 5
