"""AdamW with low-precision states (FP8-LM / MS-AMP "O2"): an FP8 first moment, an FP16 second moment.

Each step dequantizes a parameter's two moments to fp32, computes AdamW's update in fp32 (decoupled
weight decay, as ``torch.optim.AdamW``), applies it, and quantizes the new moments back. A state is
held only as its codes and scales, so ``state_dict()`` holds those, and a loaded optimizer continues
bit for bit. The formats are any of qpass's (``qpass.formats.NAMED_FORMATS``, or a
:class:`qpass.Quantizer` for a granularity, ``pow2`` or rounding of one's own) or a plain cast:
``"fp16"`` (with a per-tensor power-of-two scale, so that small moments do not underflow), ``"bf16"``,
``"fp32"``.

The second moment is stored as ``v`` itself, scaled per tensor (FP8-LM), not as ``sqrt(v)``: the
root would span half the binades, but it would also halve each step's relative change (``beta2 =
0.999`` moves ``v`` by 0.1% a step, its root by 0.05%, right at half an FP16 ulp), and a change below
half an ulp is lost to rounding every step: the state stalls (docs/optim.md measures both).

Under FSDP2 a parameter is a DTensor: its states are those of its local shard, and a per-tensor amax
is the MAX over the shards (an all-reduce over the DTensor's mesh), so every rank quantizes with the
scale one process would use and the parameters equal a single process's bit for bit. Block and
channel scales along the last axis are shard-local, which is the same thing for dim-0 shards of a
tensor of two or more dims. See docs/optim.md.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from qpass.distributed import all_reduce_max
from qpass.formats import NAMED_FORMATS, QTensor, dequantize, quantize
from qpass.formats.absmax import absmax_encode
from qpass.formats.scaling import AmaxReduction
from qpass.quantizer import Quantizer

CAST_FORMATS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
STATE_FORMATS = (*NAMED_FORMATS, *CAST_FORMATS)
MASTER_WEIGHTS = (None, "bf16_sr", "fp16")
FP16_MAX = 65504.0
_M32 = 0xFFFFFFFF


class _CastState:
    """A state as a torch dtype. FP16 gets a per-tensor power-of-two scale that maps the amax to at
    most 65504: a power of two keeps the scaling exact, so only the cast rounds."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.scaled = dtype == torch.float16

    def init(self, state: dict, key: str, shape: torch.Size, device: torch.device) -> None:
        state[key] = torch.zeros(shape, dtype=self.dtype, device=device)
        if self.scaled:
            state[key + ".scales"] = torch.ones((), device=device)

    def load(self, state: dict, key: str, shape: torch.Size) -> Tensor:
        x = state[key].float()
        return x * state[key + ".scales"] if self.scaled else x

    def store(self, state: dict, key: str, x: Tensor, reduce_amax: AmaxReduction | None) -> None:
        if not self.scaled:
            state[key].copy_(x)
            return
        amax = x.abs().amax() if x.numel() else x.new_zeros(())
        if reduce_amax is not None:
            amax = reduce_amax(amax)
        encode = absmax_encode(amax, FP16_MAX, pow2_scale=True)
        state[key].copy_(x * encode)
        state[key + ".scales"].copy_(1.0 / encode)  # exact: a power of two


_FP16 = _CastState(torch.float16)  # the "fp16" master weights' format


class _CodedState:
    """A state quantized by a :class:`Quantizer` along its last axis: codes, scales (and NVFP4's
    tensor scale) as :func:`qpass.quantize` lays them out."""

    def __init__(self, quantizer: Quantizer):
        # Read once: Quantizer.spec is a cached_property, whose lock Dynamo cannot trace.
        self.spec, self.rounding = quantizer.spec, quantizer.rounding
        self.tensor_scaled = quantizer.scaled_by_tensor_amax

    def _quantize(self, x: Tensor, reduce_amax: AmaxReduction | None) -> QTensor:
        return quantize(x, self.spec, axis=-1, rounding=self.rounding, reduce_amax=reduce_amax)

    def init(self, state: dict, key: str, shape: torch.Size, device: torch.device) -> None:
        if shape.numel() == 0:  # a rank's empty shard: nothing to hold
            state[key] = torch.zeros(0, dtype=torch.uint8, device=device)
            return
        qt = self._quantize(torch.zeros(shape, device=device), None)  # the layout, and exact zeros
        state[key], state[key + ".scales"] = qt.codes, qt.scales
        if qt.tensor_scale is not None:
            state[key + ".tensor_scale"] = qt.tensor_scale

    def load(self, state: dict, key: str, shape: torch.Size) -> Tensor:
        if shape.numel() == 0:
            return torch.zeros(shape, device=state[key].device)
        qt = QTensor(codes=state[key], scales=state[key + ".scales"], format=self.spec, shape=shape,
                     axis=max(len(shape) - 1, 0), dtype=torch.float32,
                     tensor_scale=state.get(key + ".tensor_scale"))
        return dequantize(qt)

    def store(self, state: dict, key: str, x: Tensor, reduce_amax: AmaxReduction | None) -> None:
        if x.numel() == 0:
            # The other shards' all-reduce waits for this one; zeros change no MAX.
            if reduce_amax is not None and self.tensor_scaled:
                reduce_amax(x.new_zeros(()))
            return
        qt = self._quantize(x, reduce_amax)
        state[key].copy_(qt.codes)
        state[key + ".scales"].copy_(qt.scales)
        if qt.tensor_scale is not None:
            state[key + ".tensor_scale"].copy_(qt.tensor_scale)


def state_format(value, role: str) -> _CastState | _CodedState:
    """The state format a group names for ``role``: a format name, a :class:`Quantizer` or a dict of
    its fields."""
    if isinstance(value, str) and value in CAST_FORMATS:
        return _CastState(CAST_FORMATS[value])
    if isinstance(value, str) and value not in NAMED_FORMATS:
        raise ValueError(f"unknown format {value!r} for {role}; expected one of {', '.join(STATE_FORMATS)}, "
                         "or a qpass.Quantizer")
    if isinstance(value, (str, Quantizer, dict)):
        return _CodedState(Quantizer(value) if isinstance(value, str)
                           else value if isinstance(value, Quantizer) else Quantizer(**value))
    raise ValueError(f"{role} must be a format name ({', '.join(STATE_FORMATS)}) or a qpass.Quantizer, "
                     f"got {value!r}")


def _formats(group: dict) -> tuple:
    return state_format(group["exp_avg"], "exp_avg"), state_format(group["exp_avg_sq"], "exp_avg_sq")


def _check(group: dict) -> tuple:
    """A group's state formats; bad options fail here, when the group is added, not at a step."""
    if not 0.0 <= group["lr"]:
        raise ValueError(f"lr must be >= 0, got {group['lr']}")
    if not 0.0 <= group["eps"]:
        raise ValueError(f"eps must be >= 0, got {group['eps']}")
    if not all(0.0 <= beta < 1.0 for beta in group["betas"]):
        raise ValueError(f"betas must be in [0, 1), got {group['betas']}")
    if not 0.0 <= group["weight_decay"]:
        raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']}")
    master = group["master_weights"]
    if master not in MASTER_WEIGHTS:
        raise ValueError(f"unknown master_weights {master!r}; expected one of "
                         f"{', '.join(map(repr, MASTER_WEIGHTS))}")
    if master == "bf16_sr" and any(p.dtype != torch.bfloat16 for p in group["params"]):
        raise ValueError("master_weights='bf16_sr' updates bf16 parameters in place; this group has "
                         f"{sorted({str(p.dtype) for p in group['params']})} ones")
    return _formats(group)


# ---- distributed parameters ----------------------------------------------------------------------


def _local(x: Tensor) -> Tensor:
    return x.to_local() if isinstance(x, DTensor) else x


def _amax_reduction(p: Tensor) -> AmaxReduction | None:
    """The MAX over the mesh dims a DTensor is sharded on: its whole tensor's amax."""
    if not isinstance(p, DTensor):
        return None
    groups = [p.device_mesh.get_group(dim) for dim, placement in enumerate(p.placements)
              if placement.is_shard()]
    if not groups:
        return None

    def reduce(amax: Tensor) -> Tensor:
        for group in groups:
            amax = all_reduce_max(amax, group)
        return amax

    return reduce


def _global_index(p: Tensor, local_shape: torch.Size, device: torch.device) -> Tensor:
    """Each local element's flat index in the whole tensor (int64): stochastic rounding draws by
    it, so a shard rounds as the whole tensor does."""
    offset = (0,) * len(local_shape)
    if isinstance(p, DTensor):
        offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)[1]
    index = torch.zeros(local_shape, dtype=torch.int64, device=device)
    for dim, (size, start) in enumerate(zip(local_shape, offset)):
        view = [1] * len(local_shape)
        view[dim] = size
        positions = torch.arange(start, start + size, dtype=torch.int64, device=device)
        index += positions.view(view) * math.prod(p.shape[dim + 1:])
    return index


# ---- stochastic rounding to bf16 -------------------------------------------------------------------


def _mul32(x: Tensor, c: int) -> Tensor:
    """``x * c mod 2^32`` for ``0 <= x < 2^32``, in halves so that int64 never overflows."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def _random16(index: Tensor, step: Tensor, stream: int) -> Tensor:
    """16 random bits per element, a hash of (element index, step, parameter number): counter-based,
    so nothing needs saving for a bit-identical resume, and traceable by torch.compile."""
    x = (_mul32(index & _M32, 0x9E3779B1) ^ _mul32(step.to(torch.int64) & _M32, 0x85EBCA77)
         ^ ((stream * 0xC2B2AE3D) & _M32))
    # lowbias32 (C. Wellons): an avalanche of every input bit into the output.
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    x = x ^ (x >> 16)
    return x & 0xFFFF


def stochastic_round_bf16(x: Tensor, random16: Tensor) -> Tensor:
    """fp32 ``x`` to bf16, up or down with probabilities that make the rounding unbiased: bf16 keeps
    fp32's top 16 bits, and adding a uniform 16-bit integer to the dropped bits carries into the kept
    ones with probability (dropped bits) / 2^16. NaN and Inf stay as they are."""
    # In int32 the sum wraps only for NaN bit patterns, which the where below puts back.
    rounded = ((x.view(torch.int32) + random16.to(torch.int32)) & ~0xFFFF).view(torch.float32)
    return torch.where(x.isfinite(), rounded, x).to(torch.bfloat16)


# ---- the optimizer ---------------------------------------------------------------------------------


class AdamW(torch.optim.Optimizer):
    """AdamW whose moments are stored in low precision (default: FP8 E4M3 first moment, FP16 second
    moment, each with one scale per tensor: 3 bytes per parameter instead of 8).

    ``exp_avg`` / ``exp_avg_sq``: a format name (one of ``STATE_FORMATS``), a :class:`qpass.Quantizer`
    (e.g. ``Quantizer("fp8_e4m3", granularity=("block", 128))``) or a dict of its fields.
    ``master_weights``: None (the update is applied to the parameter in its own dtype, rounded to
    nearest); ``"bf16_sr"`` (the parameter is bf16, the update applied with stochastic rounding);
    ``"fp16"`` (a master copy in FP16 with a per-tensor power-of-two scale is kept in the state and
    updated; the parameter, in its own dtype, is set to its value). Every option can differ per group.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, exp_avg="fp8_e4m3", exp_avg_sq="fp16", master_weights=None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, exp_avg=exp_avg,
                        exp_avg_sq=exp_avg_sq, master_weights=master_weights)
        # Each group's (exp_avg, exp_avg_sq) state formats, resolved once: nothing in a step looks
        # them up (a compiled step would break its graph at a Quantizer's repr or hash).
        self._group_formats: list[tuple] = []
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)  # fills in the defaults
        try:
            self._group_formats.append(_check(self.param_groups[-1]))
        except Exception:
            self.param_groups.pop()  # a refused group is not half added
            raise

    def _init_state(self, param: Tensor, group: dict, formats: tuple, state: dict, reduce_amax) -> None:
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
        for role, fmt in zip(("exp_avg", "exp_avg_sq"), formats):
            fmt.init(state, role, param.shape, param.device)
        if group["master_weights"] == "fp16":
            _FP16.init(state, "master", param.shape, param.device)
            _FP16.store(state, "master", param.float(), reduce_amax)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        number = 0  # each parameter's position: its stream of random bits
        for group, formats in zip(self.param_groups, self._group_formats):
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group, formats, number)
                number += 1
        return loss

    def _update(self, p: Tensor, group: dict, formats: tuple, number: int) -> None:
        param, grad = _local(p), _local(p.grad)
        if grad.is_sparse:
            raise RuntimeError("qpass.optim.AdamW does not support sparse gradients")
        reduce_amax = _amax_reduction(p)
        state = self.state[p]
        if not state:
            self._init_state(param, group, formats, state, reduce_amax)
        first, second = formats
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        master = group["master_weights"]
        beta1, beta2 = group["betas"]

        step = state["step"]
        step += 1
        g = grad.float()
        # The new moments in fp32 from the stored ones; the update uses them before they are requantized.
        m = first.load(state, "exp_avg", param.shape) * beta1 + g * (1 - beta1)
        v = second.load(state, "exp_avg_sq", param.shape) * beta2 + g * g * (1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        denominator = v.sqrt() / bias_correction2.sqrt() + eps
        update = lr * (m / bias_correction1) / denominator

        weights = _FP16.load(state, "master", param.shape) if master == "fp16" else param.float()
        weights = weights * (1 - lr * weight_decay) - update
        if master == "fp16":
            _FP16.store(state, "master", weights, reduce_amax)
            param.copy_(_FP16.load(state, "master", param.shape))
        elif master == "bf16_sr":
            random = _random16(_global_index(p, param.shape, param.device), step, number)
            param.copy_(stochastic_round_bf16(weights, random))
        else:
            param.copy_(weights)
        first.store(state, "exp_avg", m, reduce_amax)
        second.store(state, "exp_avg_sq", v, reduce_amax)

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but every state tensor keeps its dtype (torch casts floating-point states to
        the parameter's dtype, which would turn codes into numbers and round fp32 scales to bf16)."""
        super().load_state_dict(state_dict)
        self._group_formats = [_formats(group) for group in self.param_groups]  # the loaded groups'
        saved = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved, params):
            if saved_id in state_dict["state"]:
                device = _local(p).device
                self.state[p] = {k: v.to(device, copy=True) if isinstance(v, Tensor) else v
                                 for k, v in state_dict["state"][saved_id].items()}

    def state_bytes(self) -> int:
        """Bytes of every state tensor (codes, scales, steps, master copies) on this rank."""
        return sum(v.nbytes for state in self.state.values() for v in state.values() if isinstance(v, Tensor))

