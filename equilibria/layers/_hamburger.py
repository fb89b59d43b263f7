"""The Hamburger: a global-context block built on a matrix decomposition instead of attention.

out = ReLU(Z + Norm(W_u · ham(ReLU(W_l Z + b_l))))

* lower bread: 1×1 projection C → d (with a ReLU for NMF, whose input must be non-negative);
* ham: the low-rank reconstruction D Cᵀ of the d × n feature matrix, solved by a few iterations
  (:func:`~equilibria.layers.nmf`, :func:`~equilibria.layers.vq`, :func:`~equilibria.layers.cd`);
* upper bread: 1×1 projection d → C followed by a norm, then a residual connection and a ReLU.

Implementation note: the upper bread is applied to the factors, never to the d × n reconstruction:
W_u (D Cᵀ) = (W_u D) Cᵀ, which costs C·r·n instead of (C + r)·d·n, and BatchNorm statistics of
Y = A Cᵀ (A = W_u D) follow from the r×r covariance of C, so the norm is folded into A and a
per-channel shift. The residual add rides on the same product (``baddbmm``).

Reference: Z. Geng, M.-H. Guo, H. Chen, X. Li, K. Wei, Z. Lin, "Is Attention Better Than Matrix
Decomposition?", ICLR 2021.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from .._validate import check_bool, check_choice, check_float, check_int
from ._clusters import _cd, _cd_solve, _vq
from ._common import (
    Decomposition,
    GradMode,
    _check_finite,
    _check_float_dtype,
    _grad_mode,
    _grad_options,
    _Problem,
    _x_transpose_times,
    check_momentum,
    moving_average_bases,
    random_bases,
)
from ._decompositions import DECOMPOSITIONS
from ._nmf import _nmf, _nmf_solve

__all__ = ["HamKind", "Hamburger", "HamburgerTokens"]

HamKind = Literal["nmf", "vq", "cd"]
NormKind = Literal["batch", "none"]
InitKind = Literal["random", "online"]
_HAMS = tuple(DECOMPOSITIONS)
_NORMS = ("batch", "none")
_INITS = ("random", "online")
_DEFAULT_INV_T = {"nmf": 1.0, "vq": 100.0, "cd": 100.0}
_BN_MOMENTUM = 0.1  # torch.nn.BatchNorm defaults
_BN_EPS = 1e-5


def _fold_batch_norm(
    a: Tensor,
    coef: Tensor,
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    *,
    training: bool,
) -> tuple[Tensor, Tensor]:
    """BatchNorm of Y_b = A_b C_bᵀ over (batch, positions), folded into A and a shift.

    Returns (A', s) with BN(Y_b) = A'_b C_bᵀ + s[:, None]. Training statistics come from the
    per-sample mean m_b and covariance Σ_b of the rows of C_b: E[Y_b] = A_b m_b and
    Var_within = diag(A_b Σ_b A_bᵀ); the running statistics are updated as by ``nn.BatchNorm``.

    Args:
        a: A, shape (B, C, r).
        coef: C, shape (B, n, r).
        weight, bias: affine parameters, shape (C,).
        running_mean, running_var: buffers, shape (C,), updated in place when training.
        training: use batch statistics (and update the buffers) instead of the running ones.

    Half-precision inputs are normalised in float32 (as torch's batch norm kernels do): the
    gradient of rsqrt(var + eps) is of order var^-1.5, which overflows float16 for a channel of
    near-constant output. A' and s come back in the dtype of ``a * weight``. Autocast is turned
    off inside: under float16 autocast its products (A m_b, A Σ_b) were float16 again, and the
    gradient of a near-constant channel overflowed there.
    """
    with torch.autocast(a.device.type, enabled=False):
        out_dtype = torch.promote_types(a.dtype, weight.dtype)
        if a.dtype in (torch.float16, torch.bfloat16):
            a, coef = a.float(), coef.float()
            weight, bias = weight.float(), bias.float()
        if training:
            batch, n, _ = coef.shape
            count = batch * n
            if count < 2:
                raise ValueError(
                    f"batch norm in training needs more than one value per channel, got "
                    f"batch={batch} and n={n} positions"
                )
            m = coef.mean(dim=1, keepdim=True)  # (B, 1, r)
            centred = coef - m
            cov = torch.bmm(centred.mT, centred) / n  # (B, r, r)
            means = torch.bmm(a, m.mT).squeeze(-1)  # (B, C): per-sample channel means
            within = (torch.bmm(a, cov) * a).sum(-1)  # (B, C): per-sample channel variances
            mean = means.mean(0)  # (C,)
            var = within.mean(0) + (means - mean).square().mean(0)
            with torch.no_grad():
                running_mean.lerp_(mean.to(running_mean.dtype), _BN_MOMENTUM)
                unbiased = var * (count / (count - 1))
                running_var.lerp_(unbiased.to(running_var.dtype), _BN_MOMENTUM)
        else:
            mean, var = running_mean.to(a.dtype), running_var.to(a.dtype)
        scale = weight * torch.rsqrt(var + _BN_EPS)  # (C,)
        return (a * scale[:, None]).to(out_dtype), (bias - mean * scale).to(out_dtype)


def _functorch_active() -> bool:
    """Whether a torch.func transform (grad, vjp, jacrev, vmap, ...) is running."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False


class _BreadAndLastStep(torch.autograd.Function):
    """Lower bread, the no-grad decomposition and its last (linear) step, with a fused backward.

    Forward: X = act(W_l Z + b_l) (act = ReLU for NMF); (D, P, W) = solve(X) without gradient;
    C = (Xᵀ P) ⊙ W (W omitted for CD). Backward: dX = P (dC ⊙ W)ᵀ masked in place by the ReLU,
    then dW_l, db_l and dZ = W_lᵀ dX. Compared with autograd this allocates one (B, d, n) tensor
    less and never copies the bias into the output, which matters on CPUs where every fresh
    activation-sized buffer costs page faults.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        z: Tensor,
        weight: Tensor,
        bias: Tensor,
        block: _HamburgerBase,
        tokens: bool,
    ) -> tuple[Tensor, Tensor]:
        if tokens:  # z (B, n, C) → feats (B, n, d)
            feats = nn.functional.linear(z, weight, bias)
        else:  # z (B, C, n) → feats (B, d, n); torch.matmul would transpose and copy here
            feats = torch.bmm(weight.expand(z.shape[0], -1, -1), z).add_(bias[:, None])
        if block.ham == "nmf":
            feats.relu_()
        x = feats.mT if tokens else feats  # (B, d, n)
        bases, proj, scale = block._solve(x)
        coef = _x_transpose_times(x, proj)  # (B, n, r)
        if scale is not None:
            coef.mul_(scale)
        ctx.save_for_backward(z, weight, feats, proj, scale)
        ctx.tokens, ctx.relu = tokens, block.ham == "nmf"
        ctx.mark_non_differentiable(bases)
        return coef, bases

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, d_coef: Tensor, _: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        z, weight, feats, proj, scale = ctx.saved_tensors
        g = d_coef if scale is None else d_coef * scale  # (B, n, r)
        if ctx.tokens:
            d_feats = torch.bmm(g, proj.mT)  # (B, n, d), the layout of feats
        else:
            d_feats = torch.bmm(proj, g.mT)  # (B, d, n)
        if ctx.relu and torch.is_grad_enabled():  # create_graph=True: out of place, recorded
            d_feats = torch.ops.aten.threshold_backward(d_feats, feats, 0)
        elif ctx.relu:  # ReLU backward written in place (masked_fill_ is ~50x slower on CPU)
            torch.ops.aten.threshold_backward.grad_input(d_feats, feats, 0, grad_input=d_feats)
        d_z = d_weight = d_bias = None
        if ctx.tokens:
            if ctx.needs_input_grad[0]:
                d_z = torch.matmul(d_feats, weight)  # (B, n, C)
            if ctx.needs_input_grad[1]:
                d_weight = d_feats.flatten(0, 1).mT @ z.flatten(0, 1)  # (d, C)
            if ctx.needs_input_grad[2]:
                d_bias = d_feats.sum((0, 1))
        else:
            if ctx.needs_input_grad[0]:
                d_z = torch.bmm(weight.mT.expand(d_feats.shape[0], -1, -1), d_feats)  # (B, C, n)
            if ctx.needs_input_grad[1]:
                d_weight = torch.bmm(d_feats, z.mT).sum(0)  # (d, C)
            if ctx.needs_input_grad[2]:
                d_bias = d_feats.sum((0, 2))
        return d_z, d_weight, d_bias, None, None


class _HamburgerBase(nn.Module):
    """Parameters, configuration and shared math of :class:`Hamburger` and
    :class:`HamburgerTokens`."""

    def __init__(
        self,
        channels: int,
        *,
        ham: HamKind = "nmf",
        dim: int = 512,
        rank: int = 64,
        train_steps: int = 6,
        eval_steps: int = 7,
        inv_t: float | None = None,
        beta: float = 0.1,
        grad: GradMode = "one_step",
        grad_steps: int = 1,
        grad_init: bool = False,
        init: InitKind = "random",
        momentum: float = 0.9,
        norm: NormKind = "batch",
        lower_bread: bool = True,
        eps: float = 1e-6,
        iter_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_int("channels", channels, minimum=1)
        check_choice("ham", ham, _HAMS)
        check_int("dim", dim, minimum=1)
        check_int("rank", rank, minimum=1)
        if rank > dim:
            raise ValueError(f"rank must be in [1, dim] = [1, {dim}], got {rank}")
        check_int("train_steps", train_steps, minimum=0)
        check_int("eval_steps", eval_steps, minimum=0)
        inv_t = _DEFAULT_INV_T[ham] if inv_t is None else check_float("inv_t", inv_t, low=0.0)
        beta = check_float("beta", beta, low=0.0)
        given_grad, grad = grad, _grad_mode(grad)  # "bptt" is stored as "unrolled"
        grad_steps, grad_init = _grad_options(given_grad, grad_steps, grad_init)
        if grad_init and ham != "nmf":
            raise ValueError(
                f"grad_init=True applies to ham='nmf' (whose initial coefficients depend on the "
                f"input), got ham={ham!r}"
            )
        check_choice("init", init, _INITS)
        momentum = check_momentum(momentum)
        check_choice("norm", norm, _NORMS)
        check_bool("lower_bread", lower_bread)
        if not lower_bread and dim != channels:
            raise ValueError(
                f"without the lower bread the ham works on the input, so dim must equal "
                f"channels={channels}, got dim={dim}"
            )
        eps = check_float("eps", eps, low=0.0)
        _check_float_dtype("iter_dtype", iter_dtype)
        _check_float_dtype("dtype", dtype)
        param_dtype = torch.get_default_dtype() if dtype is None else dtype
        if iter_dtype is not None and iter_dtype != param_dtype and grad == "unrolled":
            # the functional rule (_check_iter_dtype): iter_dtype equal to the working dtype is
            # a no-op and allowed with any grad
            raise ValueError(
                f"iter_dtype={iter_dtype} applies to grad='one_step', 'jfb' or 'phantom' only "
                f"(or must equal the parameter dtype {param_dtype}), got grad={given_grad!r}"
            )
        self.iter_dtype = iter_dtype
        self.channels, self.ham, self.dim, self.rank = channels, ham, dim, rank
        self.train_steps, self.eval_steps = train_steps, eval_steps
        self.inv_t, self.beta, self.grad, self.init = inv_t, beta, grad, init
        self.grad_steps, self.grad_init = grad_steps, grad_init
        self.momentum, self.norm, self.eps = momentum, norm, eps
        self.lower_bread = lower_bread

        factory = {"device": device, "dtype": dtype}
        if lower_bread:
            self.lower_weight = nn.Parameter(torch.empty(dim, channels, **factory))  # W_l (d, C)
            self.lower_bias = nn.Parameter(torch.empty(dim, **factory))
        else:
            self.register_parameter("lower_weight", None)
            self.register_parameter("lower_bias", None)
        self.upper_weight = nn.Parameter(torch.empty(channels, dim, **factory))  # W_u (C, d)
        if norm == "batch":
            self.register_parameter("upper_bias", None)  # absorbed by the norm
            self.norm_weight = nn.Parameter(torch.empty(channels, **factory))
            self.norm_bias = nn.Parameter(torch.empty(channels, **factory))
            self.register_buffer("running_mean", torch.zeros(channels, **factory))
            self.register_buffer("running_var", torch.ones(channels, **factory))
        else:
            self.upper_bias = nn.Parameter(torch.empty(channels, **factory))
        if init == "online":  # (d, r), drawn by reset_parameters; see moving_average_bases
            self.register_buffer("bases", torch.empty(dim, rank, **factory))
        else:
            self.register_buffer("bases", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialises the projections like ``nn.Linear``, the norm to the identity and the online
        bases to a random draw."""
        if self.bases is not None:  # drawn first: the order of the random draws is unchanged
            with torch.no_grad():
                fresh = random_bases(1, self.dim, self.rank, nonnegative=self.ham == "nmf",
                                     device=self.bases.device, dtype=self.bases.dtype)  # fmt: skip
                self.bases.copy_(fresh[0])
        for weight, bias in ((self.lower_weight, self.lower_bias),
                             (self.upper_weight, self.upper_bias)):  # fmt: skip
            if weight is None:
                continue
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            if bias is not None:
                bound = 1.0 / math.sqrt(weight.shape[1])
                nn.init.uniform_(bias, -bound, bound)
        if self.norm == "batch":
            nn.init.ones_(self.norm_weight)
            nn.init.zeros_(self.norm_bias)
            self.running_mean.zero_()
            self.running_var.fill_(1.0)

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, ham={self.ham!r}, dim={self.dim}, rank={self.rank}, "
            f"train_steps={self.train_steps}, eval_steps={self.eval_steps}, inv_t={self.inv_t}, "
            f"grad={self.grad!r}, grad_steps={self.grad_steps}, grad_init={self.grad_init}, "
            f"init={self.init!r}, norm={self.norm!r}, "
            f"iter_dtype={self.iter_dtype}"
        )

    def _check_input(self, x: object, ndim: int, layout: str, channel_dim: int) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
        if x.ndim != ndim or x.shape[channel_dim] != self.channels:
            raise ValueError(
                f"x must have shape {layout} with C={self.channels}, got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"x must have a floating dtype, got {x.dtype}")
        if x.numel() == 0:
            raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}")
        param = self.upper_weight
        if x.device != param.device:
            raise ValueError(f"x must be on the block's device {param.device}, got x on {x.device}")
        if x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(
                f"x must have the block's parameter dtype {param.dtype} (or run under "
                f"torch.autocast), got x of dtype {x.dtype}"
            )
        _check_finite("x", x)
        return x

    def _activate(self, feats: Tensor) -> Tensor:
        """The lower bread's activation: ReLU (in place) for NMF, identity for VQ and CD."""
        return torch.relu_(feats) if self.ham == "nmf" else feats

    def _decompose(self, x: Tensor) -> Decomposition:
        """Runs the ham on x (B, d, n) (any strides) and updates the online bases."""
        self._check_positions(x)
        if self.ham == "nmf" and not self.lower_bread and bool((x < 0).any()):
            raise ValueError(
                f"Hamburger(ham='nmf', lower_bread=False) needs a non-negative input, its minimum "
                f"is {x.min().item():.4g}; keep the lower bread (it ends in a ReLU) or apply one"
            )
        p = self._problem(x)
        dec = _cd(p, self.beta) if self.ham == "cd" else (_nmf if self.ham == "nmf" else _vq)(p)
        self._update_bases(dec)
        return dec

    def _check_positions(self, x: Tensor) -> None:
        n = x.shape[-1]
        if n < self.rank:
            raise ValueError(
                f"rank={self.rank} exceeds the number of positions n={n}; use rank <= n or a "
                f"larger input"
            )

    def _problem(self, x: Tensor) -> _Problem:
        """The decomposition problem this block poses for x (B, d, n) in its current mode."""
        steps = self.train_steps if self.training else self.eval_steps
        no_grad_iterations = self.grad != "unrolled" and self.iter_dtype != x.dtype
        low = self.iter_dtype if no_grad_iterations else None
        grad_init = self.grad_init and self.grad in ("jfb", "phantom")  # grad may be reassigned
        return _Problem(x, self.rank, steps, self.bases, self.inv_t, self.grad, self.eps, None, low,
                        self.grad_steps if self.grad == "phantom" else 1, grad_init)  # fmt: skip

    def _solve(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """No-grad part of the one-step NMF or CD: (D, P, W) with C = XᵀP ⊙ W (W None for CD)."""
        if self.ham == "nmf":
            d, scale = _nmf_solve(self._problem(x))
            return d, d, scale
        d, proj = _cd_solve(self._problem(x), self.beta)
        return d, proj, None

    def _ham(self, z: Tensor, tokens: bool) -> Decomposition:
        """Lower bread + decomposition of z ((B, C, n), or (B, n, C) tokens)."""
        # The fused backward assumes z, the weights and the saved tensors share one dtype, which
        # autocast breaks (bf16 features, fp32 weights): under autocast take the autograd path.
        # torch.func transforms (jacrev, vmap, grad) cannot run the fused Function either (its
        # forward saves tensors through ctx and its backward writes in place): the same one-step
        # gradient then comes from autograd through the unfused path.
        fused = (
            self.lower_weight is not None
            and self.grad == "one_step"
            and self.ham != "vq"
            and not torch.is_autocast_enabled(z.device.type)
            and not _functorch_active()
        )
        if fused:
            self._check_positions(z.mT if tokens else z)
            coef, bases = _BreadAndLastStep.apply(
                z, self.lower_weight, self.lower_bias, self, tokens
            )
            dec = Decomposition(bases, coef)
            self._update_bases(dec)
            return dec
        if self.lower_weight is None:
            feats = z
        elif tokens:
            feats = self._activate(nn.functional.linear(z, self.lower_weight, self.lower_bias))
        else:
            weight = self.lower_weight.expand(z.shape[0], -1, -1)  # (B, d, C)
            feats = self._activate(torch.baddbmm(self.lower_bias[:, None], weight, z))
        return self._decompose(feats.mT if tokens else feats)

    def _update_bases(self, dec: Decomposition) -> None:
        if self.training and self.bases is not None:
            self.bases.copy_(
                moving_average_bases(self.bases, dec.bases.detach(), momentum=self.momentum)
            )

    def _upper_factors(self, dec: Decomposition) -> tuple[Tensor, Tensor]:
        """(A, s) with Norm(W_u D Cᵀ) = A Cᵀ + s: A (B, C, r), s (C,)."""
        a = torch.matmul(self.upper_weight, dec.bases)  # (C, d) @ (B, d, r) → (B, C, r)
        if self.norm == "batch":
            return _fold_batch_norm(
                a,
                dec.coef,
                self.norm_weight,
                self.norm_bias,
                self.running_mean,
                self.running_var,
                training=self.training,
            )
        return a, self.upper_bias


class Hamburger(_HamburgerBase):
    """Hamburger block for feature maps (B, C, H, W): a drop-in global-context block.

    Replaces self-attention (O(n²) in the n = H·W positions) by a matrix decomposition solved with
    a few iterations (O(n·d·r) per iteration) and trained with a one-step gradient:
    ``out = ReLU(x + Norm(W_u · ham(ReLU(W_l x + b_l))))``.

    Args:
        channels: C, channels of the input and output.
        ham: decomposition, ``"nmf"`` (default, the paper's best), ``"vq"`` or ``"cd"``.
        dim: d, channels of the lower bread's output (the rows of the decomposed matrix).
        rank: r, number of bases, 1 ≤ r ≤ d (and ≤ n at call time).
        train_steps: decomposition steps in training mode (paper: 6).
        eval_steps: decomposition steps in evaluation mode (paper: 7).
        inv_t: inverse temperature of the softmax (NMF initialisation; VQ/CD assignments);
            ``None`` picks the paper's value, 1 for NMF and 100 for VQ and CD.
        beta: ridge weight of CD's final solve.
        grad: ``"one_step"`` (the paper's: only the last coefficient update is differentiated,
            the bases held constant), ``"jfb"`` (the last update of both factors, bases and
            coefficients, from the detached iterate before it; Jacobian-free like
            :class:`equilibria.JFB`) or ``"unrolled"`` (alias ``"bptt"``: every step). The first
            two keep memory independent of the steps; ``"jfb"`` also lets the gradient reach the
            bases, through which a position sees the others. ``"phantom"`` records the last
            ``grad_steps`` updates (the core's :class:`equilibria.Phantom` with damping 1;
            ``"jfb"`` is its ``grad_steps=1``), memory growing with ``grad_steps`` only.
        grad_steps: recorded full updates of ``grad="phantom"``, ≥ 1.
        grad_init: NMF with ``grad="jfb"`` or ``"phantom"``: the detached iterate keeps the
            gradient of the initial coefficients softmax(inv_t · XᵀD_0), the no-grad updates'
            multiplicative ratios held constant (see :func:`~equilibria.layers.nmf`).
        init: ``"random"`` bases drawn per sample at every call, or ``"online"`` bases kept in the
            buffer ``bases`` (d, r): used as the initial bases at every call and, in training,
            updated after each call by :func:`~equilibria.layers.moving_average_bases`.
        momentum: weight kept on the old online bases at each update, in [0, 1): the default
            0.9 moves the buffer 10% of the way to each batch's bases (the paper's code, with
            ``bases += eta * (update - bases)`` and eta = 0.9, moves 90%: ``momentum = 1 - eta``).
        norm: ``"batch"`` (BatchNorm over batch and positions, folded into the upper bread) or
            ``"none"`` (the upper bread gets a bias instead).
        lower_bread: apply the C → d projection; when False the ham works on x itself (dim must
            equal channels, and NMF requires x ≥ 0).
        eps: added to the decompositions' denominators.
        iter_dtype: dtype of the big products of the no-grad iterations (``grad="one_step"``,
            ``"jfb"`` or ``"phantom"``); ``None`` uses the input's dtype, ``torch.bfloat16``
            about halves their cost on CPUs with AVX512-BF16/AMX and on recent GPUs. The
            differentiated steps keep the input dtype.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Example:
        >>> block = Hamburger(64, dim=64, rank=16)
        >>> block(torch.randn(2, 64, 16, 16)).shape
        torch.Size([2, 64, 16, 16])

    Reference: Geng et al., "Is Attention Better Than Matrix Decomposition?", ICLR 2021.
    """

    def forward(self, x: Tensor) -> Tensor:
        """Applies the block. x: (B, C, H, W) → (B, C, H, W)."""
        x = self._check_input(x, 4, "(B, C, H, W)", 1)
        batch, channels, height, width = x.shape
        z = x.reshape(batch, channels, height * width)  # (B, C, n)
        dec = self._ham(z, tokens=False)
        a, shift = self._upper_factors(dec)
        out = torch.baddbmm(z, a, dec.coef.mT)  # (B, C, n) = Z + A Cᵀ
        out = torch.relu_(out.add_(shift[:, None]))
        return out.view(batch, channels, height, width)


class HamburgerTokens(_HamburgerBase):
    """Hamburger block for token sequences (B, N, C); see :class:`Hamburger` for the arguments.

    The lower and upper breads act on the channel dimension of each token, the decomposition on the
    d × N matrix of all tokens of a sample; ``norm="batch"`` normalises over batch and tokens.

    Example:
        >>> block = HamburgerTokens(32, ham="vq", dim=32, rank=8)
        >>> block(torch.randn(2, 100, 32)).shape
        torch.Size([2, 100, 32])

    Reference: Geng et al., "Is Attention Better Than Matrix Decomposition?", ICLR 2021.
    """

    def forward(self, x: Tensor) -> Tensor:
        """Applies the block. x: (B, N, C) → (B, N, C)."""
        z = self._check_input(x, 3, "(B, N, C)", 2)
        dec = self._ham(z, tokens=True)
        a, shift = self._upper_factors(dec)
        out = torch.baddbmm(z, dec.coef, a.mT)  # (B, N, C) = Z + C Aᵀ
        return torch.relu_(out.add_(shift))
