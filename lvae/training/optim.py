"""Adam over one contiguous buffer: the same numbers as ``torch.optim.Adam``, a few kernels per step.

On the CPU PyTorch's ``foreach`` Adam still launches ~10 small kernels per parameter tensor (164
tensors in the 5-layer models): ~5 ms of a ~35 ms training step is launch overhead, not arithmetic.
:class:`FlatAdam` moves the parameters, their gradients and the two moment estimates into four flat
buffers and makes every ``p``, ``p.grad``, ``state[p]["exp_avg"]`` and ``state[p]["exp_avg_sq"]`` a
view into them. An Adam step is then the same elementwise arithmetic on one long tensor (bitwise
identical to the per-tensor loop: ``tests/test_optim.py``), and so is clipping, except for the
per-tensor norms of ``clip_grad_norm_``, which are kept so the total norm rounds the same way.

Autograd accumulates into the existing ``p.grad`` views, so :meth:`FlatAdam.zero_grad` zeroes the
buffer instead of dropping the gradients. ``state_dict()`` / ``load_state_dict()`` keep the
per-parameter layout of ``torch.optim.Adam``: checkpoints written by either load into the other.

``capturable=True`` (for a step captured as a CUDA graph, :mod:`lvae.training.loop`): the step counter and
the learning rate are tensors on the device, updated in place (:meth:`FlatAdam.set_lr`), so a
replayed graph reads the current values; PyTorch allows it on CUDA (and other accelerators) only.
It applies to the fused kernel (bf16, compile) as well: Adam refuses to be captured otherwise.
"""
from __future__ import annotations

import torch


class FlatAdam(torch.optim.Adam):
    """``torch.optim.Adam`` (no weight decay, no amsgrad) whose parameters, gradients and moments
    live in flat buffers; plus :meth:`clip_` (norm rescaling then value clipping) on the flat gradient.

    ``fused=False`` (exact): bitwise the numbers of ``torch.optim.Adam`` and ``clip_grad_norm_``.
    ``fused=True`` (for the opt-in modes whose rounding differs anyway): PyTorch's fused Adam kernel
    (one pass over the buffers) and the gradient norm of the flat buffer in one reduction.

    The model must not be moved (``.to()``) after the optimizer is built: its parameters are views.
    """

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float, fused: bool = False,
                 capturable: bool = False):
        params = list(params)
        if not params or len({(p.dtype, p.device) for p in params}) != 1:
            raise ValueError("FlatAdam needs a non-empty list of parameters of one dtype on one device")
        kind = {"fused": True} if fused else {"foreach": True}
        super().__init__(params, lr=lr, betas=betas, eps=eps, **kind)
        like = params[0]
        self._params = params
        self._flat = torch.empty(sum(p.numel() for p in params), dtype=like.dtype, device=like.device)
        with torch.no_grad():
            for p, view in zip(params, self._views(self._flat)):
                view.copy_(p)
                p.data = view
        self._flat_param = torch.nn.Parameter(self._flat, requires_grad=False)
        self._flat_param.grad = torch.zeros_like(self._flat)
        for p, g in zip(params, self._views(self._flat_param.grad)):
            p.grad = g
        self.capturable = capturable
        # fused too: Adam refuses a captured step() unless its group is capturable, whatever the kernel
        inner_kind = {**kind, "capturable": True} if capturable else kind
        inner_lr = torch.tensor(float(lr), device=like.device) if capturable else lr
        self._inner = torch.optim.Adam([self._flat_param], lr=inner_lr, betas=betas, eps=eps, **inner_kind)
        self.adopt_state()

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Consecutive slices of ``flat`` shaped like the parameters."""
        out, offset = [], 0
        for p in self._params:
            out.append(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        return out

    @torch.no_grad()
    def adopt_state(self) -> None:
        """Move the per-parameter state (empty, or just loaded) into the flat moment buffers and
        point every ``state[p]`` at views of them; the step counter is one shared tensor."""
        states = [self.state.get(p, {}) for p in self._params]
        if any(states) and not all(states):
            raise ValueError("FlatAdam: optimizer state present for some parameters but not others")
        flat = self._flat
        if all(states):
            steps = {float(s["step"]) for s in states}
            if len(steps) != 1:
                raise ValueError(f"FlatAdam: parameters are at different Adam steps {sorted(steps)}")
            step = states[0]["step"].detach().clone().to(torch.float32)
            m, v = torch.empty_like(flat), torch.empty_like(flat)
            for s, mv, vv in zip(states, self._views(m), self._views(v)):
                mv.copy_(s["exp_avg"])
                vv.copy_(s["exp_avg_sq"])
        else:
            step, m, v = torch.tensor(0.0), torch.zeros_like(flat), torch.zeros_like(flat)
        if self.defaults["fused"] or self.capturable:
            step = step.to(flat.device)
        self._inner.state[self._flat_param] = {"step": step, "exp_avg": m, "exp_avg_sq": v}
        for p, mv, vv in zip(self._params, self._views(m), self._views(v)):
            self.state[p] = {"step": step, "exp_avg": mv, "exp_avg_sq": vv}

    def state_dict(self) -> dict:
        """``torch.optim.Adam``'s layout; every parameter gets its own step counter (here they
        share one tensor, which a plain Adam loading the dict would increment once per parameter)."""
        sd = super().state_dict()
        sd["state"] = {k: {**v, "step": v["step"].clone()} for k, v in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.adopt_state()

    def set_lr(self, lr: float) -> None:
        """Set the learning rate (in place on the device tensor when capturable: no new graph)."""
        self.param_groups[0]["lr"] = lr
        inner = self._inner.param_groups[0]
        if self.capturable:
            inner["lr"].fill_(lr)
        else:
            inner["lr"] = lr

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor a step changes: flat parameters, flat gradient, moments, step counter."""
        st = self._inner.state[self._flat_param]
        return [self._flat, self._flat_param.grad, st["exp_avg"], st["exp_avg_sq"], st["step"]]

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: ARG002 -- the views must stay
        self._flat_param.grad.zero_()

    @torch.no_grad()
    def clip_(self, max_norm: float, max_value: float) -> None:
        """As ``clip_grad_norm_(params, max_norm, foreach=True)`` then ``clip_grad_value_(params,
        max_value)`` (bitwise unless fused); no host sync. Zero or negative limits switch a stage off."""
        if max_norm > 0:
            grads = [self._flat_param.grad] if self.defaults["fused"] else [p.grad for p in self._params]
            total = torch.nn.utils.get_total_norm(grads, 2.0, False, True)
            torch.nn.utils.clip_grads_with_norm_([self._flat_param], max_norm, total, foreach=True)
        if max_value > 0:
            torch.nn.utils.clip_grad_value_([self._flat_param], max_value, foreach=True)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("FlatAdam.step takes no closure")
        group = self.param_groups[0]
        inner = self._inner.param_groups[0]
        for key in ("betas", "eps") if self.capturable else ("lr", "betas", "eps"):
            inner[key] = group[key]  # a capturable lr is a device tensor that only set_lr changes
        self._inner.step()
