"""A float64 PyTorch port of jcjohnson/neural-style's loss at one evaluation (its ``feval``).

Not a test: a reference that nstjax's ``neural_style`` preset can be checked
against at step 0 (``tests/test_neural_style_reference.py`` checks the port
itself). It ports, module by module, what ``neural_style.lua`` builds and runs;
nothing here imports nstjax.

What was read, and what the sources say
=======================================

neural_style.lua (jcjohnson/neural-style; two stored versions were read: commit
d58853c4…, and 053a6e39… which has the ``mode = 'capture'`` refactor).

* ``preprocess``::

      local mean_pixel = torch.DoubleTensor({103.939, 116.779, 123.68})
      local perm = torch.LongTensor{3, 2, 1}
      img = img:index(1, perm):mul(256.0)
      ...
      img:add(-1, mean_pixel)

  RGB -> BGR, then ×256 (the comment above it says "[0, 255]", the code
  multiplies by 256; ``deprocess`` divides by 256), then minus the mean pixel
  (BGR order). ``init random`` is ``torch.randn(...):mul(0.001)`` directly in
  this Caffe space (so it is the mean pixel / 256 in RGB, plus noise of std
  0.001 / 256).

* The network (same in both versions)::

      if params.tv_weight > 0 then ... net:add(nn.TVLoss(params.tv_weight)) end
      for i = 1, #cnn do
        if next_content_idx <= #content_layers or next_style_idx <= #style_layers then
          ...
          local is_pooling = (layer_type == 'cudnn.SpatialMaxPooling' or layer_type == 'nn.SpatialMaxPooling')
          if is_pooling and params.pooling == 'avg' then
            assert(layer.padW == 0 and layer.padH == 0)
            ...
            local avg_pool_layer = nn.SpatialAveragePooling(kW, kH, dW, dH):type(dtype)
            net:add(avg_pool_layer)
          else
            net:add(layer)
          end
          if name == content_layers[next_content_idx] then ... nn.ContentLoss(params.content_weight, norm) ...
          if name == style_layers[next_style_idx] then ... nn.StyleLoss(params.style_weight, norm) ...

  TV first; a ContentLoss then a StyleLoss straight after a layer whose name
  matches the *next* expected name (the lists must be in network order); the
  loop stops adding layers once every loss layer is placed (truncation).
  ``-pooling avg`` swaps in ``nn.SpatialAveragePooling(kW, kH, dW, dH)``
  **without** ``:ceil()``; torch/nn's SpatialAveragePooling.lua sets
  ``self.ceil_mode = false`` (and ``count_include_pad = true``, moot with pad
  0) in ``__init``: so avg pooling is FLOOR mode, while the max pooling it
  replaces is CEIL mode (below). On an odd size the two differ in shape.

* Targets: content ``self.target:resizeAs(input):copy(input)`` in 'capture'
  mode (d58853c: ``net:forward(content_image_caffe):clone()``); style::

      self.G = self.gram:forward(input)
      self.G:div(input:nElement())
      ... self.target:resizeAs(self.G):copy(self.G):mul(self.blend_weight)   -- first image
      ... self.target:add(self.blend_weight, self.G)                        -- later ones

  with blend weights ``style_blend_weights[i] / style_blend_sum`` (equal, 1.0
  each, when ``-style_blend_weights`` is 'nil'). Gram = ``x_flat * x_flatᵀ``
  with ``x_flat = input:view(C, H*W)``, divided by C·H·W.

* Losses: ``ContentLoss: self.loss = self.crit:forward(input, self.target) *
  self.strength`` and ``StyleLoss: self.loss = self.strength *
  self.crit:forward(self.G, self.target)`` with ``self.crit = nn.MSECriterion()``
  whose ``sizeAverage`` defaults to true (torch/nn MSECriterion.lua), so the
  mean: THNN MSECriterion ``sum /= THTensor_(nElement)(input)``; its gradient
  ``norm = (sizeAverage ? 2./((real)THTensor_(nElement)(input)) : 2.)``,
  ``gradInput = norm * (input - target)``.

* Backward (``feval``: ``net:forward(x); local grad = net:updateGradInput(x,
  dy)`` with ``dy = img.new(#y):zero()``; ``loss`` = Σ ContentLoss.loss + Σ
  StyleLoss.loss, TV not included). Each loss module::

      self.gradInput = self.crit:backward(input, self.target)      -- ContentLoss
      -- StyleLoss: local dG = self.crit:backward(self.G, self.target)
      --            dG:div(input:nElement()); self.gradInput = self.gram:backward(input, dG)
      if self.normalize then
        self.gradInput:div(torch.norm(self.gradInput, 1) + 1e-8)
      end
      self.gradInput:mul(self.strength)
      self.gradInput:add(gradOutput)

  so with ``-normalize_gradients`` only the module's own gradient is divided by
  its L1 norm + 1e-8, before ×strength and before adding what flows back from
  later modules. GramMatrix backward: ``gradInput = gradOutput * x_flat +
  gradOutputᵀ * x_flat``.

* TVLoss (no loss value; ``updateOutput`` is the identity)::

      self.x_diff:copy(input[{{}, {1, -2}, {1, -2}}])
      self.x_diff:add(-1, input[{{}, {1, -2}, {2, -1}}])
      self.y_diff:copy(input[{{}, {1, -2}, {1, -2}}])
      self.y_diff:add(-1, input[{{}, {2, -1}, {1, -2}}])
      self.gradInput[{{}, {1, -2}, {1, -2}}]:add(self.x_diff):add(self.y_diff)
      self.gradInput[{{}, {1, -2}, {2, -1}}]:add(-1, self.x_diff)
      self.gradInput[{{}, {2, -1}, {1, -2}}]:add(-1, self.y_diff)
      self.gradInput:mul(self.strength)
      self.gradInput:add(gradOutput)

  i.e. the gradient of strength·½Σ over the (H−1)×(W−1) block of
  (x[:, i, j] − x[:, i, j+1])² + (x[:, i, j] − x[:, i+1, j])², in Caffe space
  (×256 pixels): the last row's horizontal and last column's vertical
  differences are left out. (x_diff/y_diff are ``resize(3, H-1, W-1)``: 3
  channels hard-coded.)

* Version note (normalize_gradients). 053a6e39 reads instead
  ``cmd:option('-normalize_gradients', 0.0)`` and
  ``if (self.normalize ~= 0.0) and (content_ignition == false) then`` (÷ ‖·‖₁^p
  + 1e-8 for p ≠ 1) with a file-level ``local content_ignition = true`` that
  ``feval`` resets only after the backward (``content_ignition = loss < 1``):
  there, at the first evaluation, normalisation is OFF. That looks like the
  variant of the closed, unmerged PR #374 "Flexible gradients normalization"
  (VaKonS, 2017; the index stores fork commits under the repository), not
  jcjohnson's: d58853c, and the other copies found (e.g. forks with the
  'capture' refactor), read ``cmd:option('-normalize_gradients', false)`` and
  ``if self.normalize then``, and jcjohnson (issue #326) calls it "the flag
  ``-normalize_gradients``". This port does that: normalisation on at every
  evaluation, step 0 included.

loadcaffe (szagoruyko/loadcaffe, loadcaffe.cpp, both ``convertProtoToLuaV1``
and ``V2``)::

    case NN:
      if(param.pool() == caffe::PoolingParameter::MAX)
        sprintf(buf, "nn.SpatialMaxPooling(%d, %d, %d, %d, %d, %d):ceil()", kW, kH, dW, dH, padW, padH);
      else if(param.pool() == caffe::PoolingParameter::AVE)
        sprintf(buf, "nn.SpatialAveragePooling(%d, %d, %d, %d, %d, %d):ceil()", ...);

(cudnn the same, ``cudnn.SpatialMaxPooling(...):ceil()``); ReLU is
``nn.ReLU(true)`` / ``cudnn.ReLU(true)``, i.e. IN PLACE; convolutions
``nn.SpatialConvolution(nIn, nOut, kW, kH, dW, dH, pad_w, pad_h)`` whose
weights are the Caffe blob copied as is (``THFloatTensor_resize4d(weight,
nOutputPlane, nInputPlane, kW, kH); memcpy(...)``: OIHW, cross-correlation,
input channels BGR). VGG-19's pools are MAX, kernel 2, stride 2, pad 0, so:
max pooling is 2×2/2 ceil mode: THNN ``oheight = ceil((float)(iheight - kH +
2*padH) / dH) + 1`` (the "last pooling starts inside the image" correction
applies only ``if (padW || padH)``), the window clipped at the border
(``hend = fminf(hstart + kH, iheight)``) -- the same as torch's
``max_pool2d(..., ceil_mode=True)`` at pad 0. The ``:ceil()`` of loadcaffe's
own AVE layers never matters here (VGG-19 has none, and neural_style builds its
avg layers itself, in floor mode).

A consequence of the in-place ReLU, ported here: ``nn.Sequential`` hands each
module ``previousModule.output`` on the backward pass, and a loss module's
output is its input tensor; a loss module placed on a *conv* layer (e.g.
``conv4_2``) therefore sees, in ``updateGradInput``, that tensor after the next
in-place ReLU overwrote it: its loss is of the pre-ReLU activation but its
gradient is ``2/N (relu(F) − T)`` (ContentLoss) or ``dG·relu(F) + dGᵀ·relu(F)``
with dG from the pre-ReLU Gram (StyleLoss) -- unless it is the last loss
module, after which the net stops before that ReLU. With relu*/pool* layers
(the defaults) nothing is overwritten and the gradient is the true one.
nn.Threshold in place: ``if ((*input_data) <= threshold) *gradOutput_data = 0``
on the (already rectified) tensor.

All here is float64 (the Lua runs float32, or CUDA float32), unless a ``dtype`` says otherwise.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MEAN_PIXEL_BGR = (103.939, 116.779, 123.68)
SCALE = 256.0
EPS = 1e-8
BLOCKS = (2, 2, 4, 4, 4)


def vgg19_layers() -> tuple[tuple[str, str], ...]:
    """(kind, name) of VGG-19's layers up to pool5, as the Caffe prototxt (and loadcaffe) names them.

    The Caffe net goes on with fc6, relu6, drop6, … (nn.View + nn.Linear), which
    neural_style would add too if a loss layer were never matched; we raise instead.
    """
    layers = []
    for b, n in enumerate(BLOCKS, 1):
        for i in range(1, n + 1):
            layers += [("conv", f"conv{b}_{i}"), ("relu", f"relu{b}_{i}")]
        layers.append(("pool", f"pool{b}"))
    return tuple(layers)


def preprocess(rgb) -> torch.Tensor:
    """neural_style's ``preprocess``: (H, W, 3) RGB in [0, 1] -> (3, H, W) BGR ×256 minus the mean pixel."""
    x = torch.as_tensor(np.asarray(rgb, dtype=np.float64)).permute(2, 0, 1)
    x = x[[2, 1, 0]] * SCALE
    return x - torch.tensor(MEAN_PIXEL_BGR, dtype=torch.float64).view(3, 1, 1)


def pool2x2(x: torch.Tensor, pooling: str) -> torch.Tensor:
    """2×2 stride-2 pooling of a (C, H, W) tensor: max in ceil mode (loadcaffe), avg in floor mode (neural_style)."""
    if pooling == "max":
        return F.max_pool2d(x[None], 2, 2, ceil_mode=True)[0]
    if pooling == "avg":
        return F.avg_pool2d(x[None], 2, 2, ceil_mode=False)[0]
    raise ValueError(f"pooling must be 'max' or 'avg', not {pooling!r}")


def to_torch_conv(params, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """HWIO kernel (3, 3, C_in, C_out) and bias -> torch OIHW float64 weight and bias."""
    kernel = np.asarray(params[name]["kernel"], dtype=np.float64)
    bias = np.asarray(params[name]["bias"], dtype=np.float64)
    return (torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))),
            torch.from_numpy(bias.copy()))


# --- The modules, as neural_style.lua / loadcaffe build them -------------------------------------

class _Module:
    name = ""
    output: torch.Tensor

    def update_output(self, x):
        raise NotImplementedError

    def update_grad_input(self, x, grad_output):
        raise NotImplementedError


class _Conv(_Module):
    """nn.SpatialConvolution(nIn, nOut, 3, 3, 1, 1, 1, 1)."""

    def __init__(self, name, weight, bias):
        self.name, self.weight, self.bias = name, weight, bias

    def _f(self, x):
        return F.conv2d(x[None], self.weight, self.bias, padding=1)[0]

    def update_output(self, x):
        self.output = self._f(x)
        return self.output

    def update_grad_input(self, x, grad_output):
        with torch.enable_grad():
            xi = x.detach().clone().requires_grad_(True)
            (g,) = torch.autograd.grad(self._f(xi), xi, grad_output)
        return g


class _ReLU(_Module):
    """nn.ReLU(true): in place on its input (the previous module's output tensor)."""

    def __init__(self, name):
        self.name = name

    def update_output(self, x):
        self.output = x.clamp_(min=0.0)   # in place, as Threshold(0, 0, true)
        return self.output

    def update_grad_input(self, x, grad_output):
        # x is the rectified tensor; THNN: if (*input_data <= threshold) *gradOutput_data = 0
        return torch.where(x <= 0.0, torch.zeros_like(grad_output), grad_output)


class _Pool(_Module):
    """nn.SpatialMaxPooling(2, 2, 2, 2, 0, 0):ceil() or neural_style's nn.SpatialAveragePooling(2, 2, 2, 2)."""

    def __init__(self, name, pooling):
        self.name, self.pooling = name, pooling

    def update_output(self, x):
        self.output = pool2x2(x, self.pooling)
        return self.output

    def update_grad_input(self, x, grad_output):
        with torch.enable_grad():
            xi = x.detach().clone().requires_grad_(True)
            (g,) = torch.autograd.grad(pool2x2(xi, self.pooling), xi, grad_output)
        return g


class _TVLoss(_Module):
    name = "tv"

    def __init__(self, strength):
        self.strength = strength

    def update_output(self, x):
        self.output = x
        return x

    def update_grad_input(self, x, grad_output):
        g = torch.zeros_like(x)
        x_diff = x[:3, :-1, :-1] - x[:3, :-1, 1:]
        y_diff = x[:3, :-1, :-1] - x[:3, 1:, :-1]
        g[:, :-1, :-1] += x_diff + y_diff
        g[:, :-1, 1:] -= x_diff
        g[:, 1:, :-1] -= y_diff
        return g * self.strength + grad_output


def _mse(x, t):
    return float(((x - t) ** 2).sum() / x.numel())


def _mse_backward(x, t):
    return (2.0 / x.numel()) * (x - t)


def _l1_normalize(g):
    return g / (g.abs().sum() + EPS)


class _ContentLoss(_Module):
    def __init__(self, strength, normalize):
        self.strength, self.normalize = strength, normalize
        self.mode, self.loss, self.target = "none", 0.0, None

    def update_output(self, x):
        if self.mode == "loss":
            self.loss = _mse(x, self.target) * self.strength
        elif self.mode == "capture":
            self.target = x.clone()
        self.output = x
        return x

    def update_grad_input(self, x, grad_output):
        if self.mode != "loss":
            return grad_output.clone()
        g = _mse_backward(x, self.target)
        if self.normalize:
            g = _l1_normalize(g)
        return g * self.strength + grad_output


def _gram(x):
    flat = x.reshape(x.shape[0], -1)
    return flat @ flat.T


class _StyleLoss(_Module):
    def __init__(self, strength, normalize):
        self.strength, self.normalize = strength, normalize
        self.mode, self.loss, self.target, self.blend_weight, self.G = "none", 0.0, None, None, None

    def update_output(self, x):
        self.G = _gram(x) / x.numel()
        if self.mode == "capture":
            if self.blend_weight is None:
                self.target = self.G.clone()
            elif self.target is None:
                self.target = self.G * self.blend_weight
            else:
                self.target = self.target + self.blend_weight * self.G
        elif self.mode == "loss":
            self.loss = self.strength * _mse(self.G, self.target)
        self.output = x
        return x

    def update_grad_input(self, x, grad_output):
        if self.mode != "loss":
            return grad_output
        dG = _mse_backward(self.G, self.target) / x.numel()
        flat = x.reshape(x.shape[0], -1)
        g = (dG @ flat + dG.T @ flat).reshape(x.shape)
        if self.normalize:
            g = _l1_normalize(g)
        return g * self.strength + grad_output


class _Sequential:
    def __init__(self, modules):
        self.modules = modules

    def forward(self, x):
        for m in self.modules:
            x = m.update_output(x)
        return x

    def update_grad_input(self, x, grad_output):
        """nn.Sequential: module i gets ``modules[i-1].output`` (after any later in-place change) as input."""
        g = grad_output
        for i in range(len(self.modules) - 1, -1, -1):
            inp = self.modules[i - 1].output if i > 0 else x
            g = self.modules[i].update_grad_input(inp, g)
        return g


def build_net(params, *, content_layers, style_layers, content_weight, style_weight, tv_weight,
              pooling="max", normalize_gradients=False, dtype=torch.float64):
    """The nn.Sequential neural_style.lua assembles; returns (net, content_losses, style_losses).
    Its weights in ``dtype`` (float64; float32 is what the Lua computes in)."""
    if pooling not in ("max", "avg"):
        raise ValueError(f"pooling must be 'max' or 'avg', not {pooling!r}")
    content_layers, style_layers = list(content_layers), list(style_layers)
    ci = si = 0  # the Lua's matching, on the names alone first: each list must follow the network's order
    for _, name in vgg19_layers():
        ci += ci < len(content_layers) and name == content_layers[ci]
        si += si < len(style_layers) and name == style_layers[si]
    if ci < len(content_layers) or si < len(style_layers):
        raise ValueError(f"layers not found in VGG-19's order: content {content_layers[ci:]}, "
                         f"style {style_layers[si:]} (neural_style matches them in network order; the Lua "
                         "would go on into fc6 and fail)")
    modules, content_losses, style_losses = [], [], []
    if tv_weight > 0:
        modules.append(_TVLoss(tv_weight))
    ci = si = 0
    for kind, name in vgg19_layers():
        if not (ci < len(content_layers) or si < len(style_layers)):
            break
        if kind == "conv":
            modules.append(_Conv(name, *(w.to(dtype) for w in to_torch_conv(params, name))))
        elif kind == "relu":
            modules.append(_ReLU(name))
        else:
            modules.append(_Pool(name, pooling))
        if ci < len(content_layers) and name == content_layers[ci]:
            m = _ContentLoss(content_weight, normalize_gradients)
            modules.append(m)
            content_losses.append(m)
            ci += 1
        if si < len(style_layers) and name == style_layers[si]:
            m = _StyleLoss(style_weight, normalize_gradients)
            modules.append(m)
            style_losses.append(m)
            si += 1
    return _Sequential(modules), content_losses, style_losses


def neural_style_feval(params, content, styles, blend_weights=None, *, content_layers=("relu4_2",),
                       style_layers=("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"),
                       content_weight=5.0, style_weight=100.0, tv_weight=1e-3, pooling="max",
                       normalize_gradients=False, dtype=torch.float64):
    """neural_style.lua up to its ``feval``: the net built and the targets captured once; returns
    ``feval(image)``, which gives what :func:`neural_style_eval` returns at ``image`` (each call
    one forward and one backward pass, as the Lua's). ``dtype``: what the net computes in, the
    images preprocessed in float64 and then cast (float64; float32 is the Lua's own, for
    measuring what float32 rounding does)."""
    styles = list(styles)
    if not styles:
        raise ValueError("at least one style image")
    if blend_weights is None:
        blend_weights = [1.0] * len(styles)
    blend_weights = [float(w) for w in blend_weights]
    if len(blend_weights) != len(styles):
        raise ValueError("-style_blend_weights and -style_images must have the same number of elements")
    total = sum(blend_weights)
    blend_weights = [w / total for w in blend_weights]

    net, content_losses, style_losses = build_net(
        params, content_layers=content_layers, style_layers=style_layers, content_weight=content_weight,
        style_weight=style_weight, tv_weight=tv_weight, pooling=pooling,
        normalize_gradients=normalize_gradients, dtype=dtype)

    def caffe(image):
        return preprocess(image).to(dtype)

    with torch.no_grad():
        # Capture content targets
        for m in content_losses:
            m.mode = "capture"
        net.forward(caffe(content))
        # Capture style targets
        for m in content_losses:
            m.mode = "none"
        for style, w in zip(styles, blend_weights):
            for m in style_losses:
                m.mode, m.blend_weight = "capture", w
            net.forward(caffe(style))
        for m in content_losses + style_losses:
            m.mode = "loss"

    @torch.no_grad()
    def feval(image) -> dict:
        x = caffe(image)
        y = net.forward(x)
        grad = net.update_grad_input(x, torch.zeros_like(y))
        grad_caffe = grad.numpy().astype(np.float64)
        # x_caffe[c] = 256 * rgb[..., 2 - c] - mean[c]
        grad_rgb = SCALE * np.ascontiguousarray(grad_caffe[::-1].transpose(1, 2, 0))
        return {"content": float(sum(m.loss for m in content_losses)),
                "style": float(sum(m.loss for m in style_losses)),
                "grad_caffe": grad_caffe, "grad_rgb": grad_rgb}

    return feval


def neural_style_eval(params, image, content, styles, blend_weights=None, **options) -> dict:
    """neural_style.lua's loss and gradient at ``image``, float64.

    ``params``: {conv{b}_{i}: {kernel: (3, 3, C_in, C_out) HWIO, bias: (C_out,)}}, Caffe VGG-19
    weights (BGR input channels, 0–255-scaled mean-subtracted input). ``image``, ``content`` and
    each of ``styles``: (H, W, 3) RGB in [0, 1] (the styles any size). ``blend_weights``: one per
    style, None = equal; normalised to sum 1. ``options``: :func:`neural_style_feval`'s (layers,
    weights, pooling, normalize_gradients, dtype; neural_style.lua's defaults, float64).

    Returns {"content": Σ ContentLoss.loss, "style": Σ StyleLoss.loss (TV adds none),
    "grad_caffe": (3, H, W) gradient w.r.t. the Caffe-space (BGR) image, as feval returns it
    (TV and, with normalize_gradients, the normalised terms included), "grad_rgb": (H, W, 3) the same
    w.r.t. the RGB [0, 1] image (×256, BGR -> RGB)}.
    """
    return neural_style_feval(params, content, styles, blend_weights, **options)(image)
