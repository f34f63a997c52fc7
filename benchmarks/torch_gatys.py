"""The Gatys et al. objective in plain eager PyTorch: the benchmarks' reference side.

The same objective as :func:`nstjax.losses.make_objective` (same layer names,
Gram normalisations, reductions and preprocessing), written directly with
``torch.nn.functional`` (NCHW, OIHW kernels, ``padding=1`` 3×3 convolutions,
2×2 stride-2 pooling). The network stops after the deepest layer the loss
reads, as the PyTorch tutorial trims its ``nn.Sequential``. The weights are
frozen (``requires_grad=False``): a backward pass computes only dL/dpixels.

Inputs are the numpy arrays the JAX side uses: params ``{conv1_1: {kernel
(HWIO), bias}}`` are converted with :func:`params_to_torch` (HWIO → OIHW).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from nstjax.vgg import LAYER_NAMES


def set_precision(precision: str) -> None:
    """'float32': IEEE float32 convolutions and matrix products on CUDA (PyTorch's default lets cuDNN
    compute float32 convolutions in TF32); 'tf32': TF32 for both. No effect on a CPU."""
    mode = {"float32": "ieee", "tf32": "tf32"}[precision]
    if hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision"):  # torch >= 2.9
        torch.backends.cudnn.conv.fp32_precision = torch.backends.cuda.matmul.fp32_precision = mode
    else:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"


def params_to_torch(params: dict, device="cpu") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: {kernel HWIO, bias}}`` numpy arrays → ``{name: (weight OIHW, bias)}`` float32 tensors
    (frozen: ``requires_grad=False``)."""
    out = {}
    for name, p in params.items():
        w = np.ascontiguousarray(np.transpose(np.asarray(p["kernel"], np.float32), (3, 2, 0, 1)))
        out[name] = (torch.from_numpy(w).to(device),
                     torch.from_numpy(np.asarray(p["bias"], np.float32).copy()).to(device))
    return out


def preprocess(x: torch.Tensor, channel_order: str, scale: float, mean, std) -> torch.Tensor:
    """(flip(x) · scale − mean) / std on an NCHW RGB batch in [0, 1]."""
    if channel_order == "BGR":
        x = x.flip(1)
    mean = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * scale - mean) / std


def block_sizes(weights: dict) -> tuple[int, ...]:
    """The convolutions per block of the VGG network whose conv{b}_{i} ``weights`` are."""
    return tuple(sum(name.startswith(f"conv{b}_") for name in weights) for b in range(1, 6))


def features(x: torch.Tensor, weights: dict, layers: Sequence[str], pooling: str = "max") -> dict:
    """Named VGG activations of an NCHW batch (the network that ``weights`` make: VGG11 to 19),
    stopping after the deepest one."""
    deepest = max(layers, key=LAYER_NAMES.index)
    wanted, out = set(layers), {}
    for b, n in enumerate(block_sizes(weights), 1):
        for i in range(1, n + 1):
            w, bias = weights[f"conv{b}_{i}"]
            x = F.conv2d(x, w, bias, padding=1)
            if f"conv{b}_{i}" in wanted:
                out[f"conv{b}_{i}"] = x
            if deepest == f"conv{b}_{i}":
                return out
            x = F.relu(x)
            if f"relu{b}_{i}" in wanted:
                out[f"relu{b}_{i}"] = x
            if deepest == f"relu{b}_{i}":
                return out
        x = F.max_pool2d(x, 2, 2) if pooling == "max" else F.avg_pool2d(x, 2, 2)
        if f"pool{b}" in wanted:
            out[f"pool{b}"] = x
        if deepest == f"pool{b}":
            return out
    return out


def gram(f: torch.Tensor, norm: str) -> torch.Tensor:
    """G = F Fᵀ / g for features (1, N, H, W); g = 1, M or N·M."""
    _, n, h, w = f.shape
    f = f.reshape(n, h * w)
    g = f @ f.t()
    return g / {"none": 1.0, "M": float(h * w), "NM": float(n * h * w)}[norm]


def content_loss(f, p, reduction):
    sq = (f - p).square()
    if reduction == "half_sum":
        return 0.5 * sq.sum()
    return sq.sum() if reduction == "sum" else sq.mean()


def style_layer_loss(g, a, n, m, reduction):
    sq = (g - a).square()
    if reduction == "gatys":
        return sq.sum() / (4.0 * float(n) ** 2 * float(m) ** 2)
    return sq.sum() if reduction == "sum" else sq.mean()


def total_variation(x: torch.Tensor, norm: str) -> torch.Tensor:
    dy = x[:, :, 1:, :] - x[:, :, :-1, :]
    dx = x[:, :, :, 1:] - x[:, :, :, :-1]
    if norm == "squared":
        return dy.square().sum() + dx.square().sum()
    return dy.abs().sum() + dx.abs().sum()


class GatysObjective:
    """``objective(x NCHW) -> (total, content, style, tv)``, mirroring nstjax.losses.

    ``spec`` is an :class:`nstjax.losses.LossSpec` (or anything with the same
    fields), ``prep`` an :class:`nstjax.vgg.Preprocessing`; ``content`` and
    ``style`` are (H, W, 3) numpy images in [0, 1] used to compute the targets.
    """

    def __init__(self, weights: dict, spec, prep, pooling: str, content: np.ndarray, style: np.ndarray,
                 alpha: float, beta: float, content_layer_weights, style_layer_weights, tv_weight: float = 0.0):
        self.weights, self.spec, self.pooling = weights, spec, pooling
        self.device = next(iter(weights.values()))[0].device
        self.prep = (prep.channel_order, prep.scale, prep.mean, prep.std)
        self.alpha, self.beta, self.tv_weight = float(alpha), float(beta), float(tv_weight)
        self.cw = [float(v) for v in content_layer_weights]
        self.sw = [float(v) for v in style_layer_weights]
        with torch.no_grad():
            cf = self._features(to_nchw(content, self.device), spec.content_layers)
            sf = self._features(to_nchw(style, self.device), spec.style_layers)
            self.content_targets = {k: cf[k].detach() for k in spec.content_layers}
            self.style_targets = {k: gram(sf[k], spec.gram_norm).detach() for k in spec.style_layers}
        self.layers = tuple(dict.fromkeys(tuple(spec.content_layers) + tuple(spec.style_layers)))

    def _features(self, x, layers):
        return features(preprocess(x, *self.prep), self.weights, layers, self.pooling)

    def __call__(self, x: torch.Tensor):
        spec = self.spec
        feats = self._features(x, self.layers)
        l_content = sum(w * content_loss(feats[k], self.content_targets[k], spec.content_reduction)
                        for w, k in zip(self.cw, spec.content_layers))
        l_style = 0.0
        for w, k in zip(self.sw, spec.style_layers):
            f = feats[k]
            _, n, h, wd = f.shape
            l_style = l_style + w * style_layer_loss(gram(f, spec.gram_norm), self.style_targets[k], n, h * wd,
                                                     spec.style_reduction)
        content = self.alpha * l_content
        style = self.beta * l_style
        tv = (self.tv_weight * total_variation(x, spec.tv_norm) if self.tv_weight
              else torch.zeros((), device=x.device))
        return content + style + tv, content, style, tv


def to_nchw(img: np.ndarray, device="cpu") -> torch.Tensor:
    """(H, W, 3) numpy → (1, 3, H, W) float32 tensor (a copy)."""
    return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(img, np.float32), (2, 0, 1))[None])).to(device)


def loss_and_grad(objective: GatysObjective, pixels: np.ndarray) -> tuple[float, np.ndarray]:
    """One evaluation: the total loss and d total / d pixels as an (H, W, 3) numpy array."""
    x = to_nchw(pixels, objective.device).requires_grad_(True)
    total = objective(x)[0]
    total.backward()
    return float(total.detach()), x.grad[0].permute(1, 2, 0).cpu().numpy()


def loss_only(objective: GatysObjective, pixels: np.ndarray) -> float:
    """The total loss alone (no gradient)."""
    with torch.no_grad():
        return float(objective(to_nchw(pixels, objective.device))[0])


def tutorial_loop(objective: GatysObjective, content: np.ndarray, max_evaluations: int = 300,
                  max_iter: int = 20, on_eval=None):
    """The PyTorch tutorial's loop: LBFGS (defaults: lr 1, history 100, no line search) on the
    content image, clamping the input to [0, 1] inside the closure, until ``max_evaluations``
    closure calls (``max_iter`` per ``optimizer.step``). Returns (image, losses per evaluation)."""
    img = to_nchw(content, objective.device).requires_grad_(True)
    opt = torch.optim.LBFGS([img], max_iter=max_iter)
    losses: list[float] = []

    def closure():
        with torch.no_grad():
            img.clamp_(0, 1)
        opt.zero_grad()
        total = objective(img)[0]
        total.backward()
        losses.append(float(total.detach()))
        if on_eval is not None:
            on_eval(len(losses), losses[-1])
        return total

    while len(losses) < max_evaluations:
        before = len(losses)
        opt.step(closure)
        if len(losses) == before:  # LBFGS converged (tolerances): nothing more to do
            break
    with torch.no_grad():
        img.clamp_(0, 1)
    return img.detach()[0].permute(1, 2, 0).cpu().numpy(), losses
