"""FSDP2 all-gathers of weights in low precision: codes and a scale instead of the weight.

Under ``fully_shard`` each rank holds a dim-0 shard of every weight, and FSDP2 all-gathers the
whole weight before a unit's forward (and again before its backward). For a site whose weight every
GEMM quantizes with one per-tensor quantizer (``fp8-train``: E4M3 per tensor in fprop and dgrad),
qpass quantizes the shard before the all-gather, through FSDP2's extension of the sharded tensor
(``fsdp_pre_all_gather`` / ``fsdp_post_all_gather``): the scale comes from the MAX of the shards'
amaxes (one all-reduce of a scalar, so it is the whole weight's scale), the shard's codes are
gathered (one byte per element, half a bf16 all-gather), and what arrives is the whole weight's
codes, bit for bit those of quantizing the gathered weight. FSDP2 is given their values as the
unsharded weight, and the codes themselves are kept for the GEMMs: the weight's operand node
(:func:`qpass.ops.matmul.operand`) takes them (:func:`gathered_operand`) instead of quantizing the
values again, in either orientation, since one scale serves both.

The extension is attached to FSDP2's own objects (its parameter group's ``FSDPParam``s, their
sharded local tensors and all-gather buffers, as of torch 2.13): where they are not as expected, the
weights are gathered in their own dtype and qpass warns.

Weights quantized per channel, per block (MX) or by NVFP4 are gathered in their own dtype: their
dgrad quantizes the weight along the other axis, which the forward's codes cannot give (see
docs/distributed.md), as are weights under delayed scaling, whose history is the graph's.
Gradients are reduce-scattered by FSDP2 as always.
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch import Tensor, nn

from qpass.distributed import all_reduce_max
from qpass.formats import quantize
from qpass.gemm_operand import TORCH_DTYPES, GemmOperand, transposed
from qpass.quantizer import Quantizer

# The gathered weights' codes, by the unsharded weight's storage (FSDP2 keeps one storage per
# unsharded weight, freed after use and allocated again for the next all-gather).
_GATHERED: dict[int, tuple[weakref.ref, int, GemmOperand]] = {}


def gathered_operand(x: Tensor, quantizer: Quantizer, axis: int) -> GemmOperand | None:
    """The gathered codes of ``x``, if ``x`` is an unsharded weight that arrived as codes of
    ``quantizer`` and is unchanged since (``x`` or its transpose, quantized along either axis)."""
    if not (x.ndim == 2 and quantizer.per_tensor) or x.is_meta:
        return None
    entry = _GATHERED.get(x.untyped_storage()._cdata)
    if entry is None:
        return None
    weight, version, op = entry
    weight = weight()
    if (weight is None or op.quantizer != quantizer or x._version != version
            or x.storage_offset() != weight.storage_offset()):
        return None
    along_last = axis % 2 == 1  # along x's last axis
    if (x.shape, x.stride()) == (weight.shape, weight.stride()):  # the weight: gathered along K
        return op if along_last else transposed(op)
    if (x.mT.shape, x.mT.stride()) == (weight.shape, weight.stride()):
        return transposed(op) if along_last else op
    return None


class LowPrecisionGather:
    """The FSDP2 extension of one sharded weight: its shard quantized before the all-gather."""

    def __init__(self, quantizer: Quantizer, shard: Tensor):
        self.quantizer = quantizer
        self.shard = shard  # the sharded local tensor (FSDP2 updates it in place)

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        """The shard's codes, padded to FSDP2's padded shard size, scaled by the whole weight's amax."""
        group = mesh.get_group()
        rows = -(-outer_size[0] // group.size())  # every rank's padded shard: the first one's
        shard = self.shard.detach()
        if mp_policy.param_dtype is not None:  # what the forward would have quantized: the cast weight
            shard = shard.to(mp_policy.param_dtype)
        if shard.numel() == 0:  # a rank with no rows: only zeros, whose amax changes no MAX
            shard = shard.new_zeros(1, *outer_size[1:])
        qt = quantize(shard, self.quantizer.spec, -1, rounding=self.quantizer.rounding,
                      reduce_amax=lambda amax: all_reduce_max(amax, group))
        codes = qt.codes.view(torch.uint8)[: self.shard.shape[0]]
        padded = codes.new_zeros(rows, *codes.shape[1:])
        padded[: codes.shape[0]] = codes
        return (padded,), (qt.scales, tuple(outer_size))

    def fsdp_post_all_gather(self, outputs, metadata, param_dtype, *, out=None):
        """The whole weight's values, in ``param_dtype``, from the gathered codes; the codes kept for
        its GEMMs."""
        (codes,), (scale, size) = outputs, metadata
        dtype = self.shard.dtype if param_dtype is None else param_dtype
        element = self.quantizer.spec.element
        codes = codes[: size[0]].view(TORCH_DTYPES[element.name])
        op = GemmOperand(codes, scale, None, self.quantizer, size[-1])
        values = op.dequantize().to(dtype)
        if out is not None:
            # In place, as FSDP2 fills its own outputs: autograd saved this weight, and its version
            # must not move (the values are the same weight's, gathered again).
            with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(out):
                out.copy_(values.reshape(out.shape))
            _register(out, op)
            return None
        _register(values, op)
        return values, (values,)


def _register(weight: Tensor, op: GemmOperand) -> None:
    # The weights of deleted models go: their codes would outlive them here.
    for key in [key for key, (ref, _, _) in _GATHERED.items() if ref() is None]:
        del _GATHERED[key]
    _GATHERED[weight.untyped_storage()._cdata] = (weakref.ref(weight), weight._version, op)


_FSDP_PARAM_ATTRIBUTES = ("_module_info", "_sharded_local_tensor", "_init_extensions", "all_gather_outputs",
                          "fsdp_placement")


def gather_in_low_precision(model: nn.Module, plans: dict, paths: dict[str, str]) -> list[str]:
    """Give every FSDP2-sharded weight of ``model`` whose site quantizes it per tensor alike in both
    its GEMMs the low-precision all-gather; returns the sites so served. ``paths``: module id to its
    path as site names spell it."""
    from torch.distributed.fsdp import FSDPModule

    by_weight = {}
    for plan in plans.values():
        if plan.excluded is not None or "weight" not in plan.site.roles or len(plan.products) != 1:
            continue
        (product,) = plan.products
        q, run = product.quantizers, product.execution
        # FP8 codes, which the scaled GEMMs take as they are (fp6/fp4 per tensor are rare enough).
        if (product.roles == ("input", "weight") and q.shares_b and not run.b_state
                and q.b.spec.element.name in TORCH_DTYPES):
            by_weight[plan.site.module] = (plan.name, q.b)
    served = []
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        group = module._get_fsdp_state()._fsdp_param_group
        fsdp_params = [] if group is None else group.fsdp_params
        if not all(hasattr(p, attr) for p in fsdp_params for attr in _FSDP_PARAM_ATTRIBUTES):
            warnings.warn("qpass: this torch's FSDP2 parameters are not as qpass knows them (torch 2.13): "
                          "weights are all-gathered in their own dtype", stacklevel=2)
            return []
        for fsdp_param in fsdp_params:
            info = fsdp_param._module_info
            found = by_weight.get(paths.get(str(id(info.module))))
            if info.param_name != "weight" or found is None or fsdp_param.fsdp_placement.dim != 0:
                continue
            shard = fsdp_param._sharded_local_tensor
            if getattr(shard, "fsdp_pre_all_gather", None) is None:
                extension = LowPrecisionGather(found[1], shard)
                # FSDP2 looks the extension up on the sharded tensor itself.
                shard.fsdp_pre_all_gather = extension.fsdp_pre_all_gather
                shard.fsdp_post_all_gather = extension.fsdp_post_all_gather
                fsdp_param._init_extensions()
                # The all-gathers so far were of the weight itself, into buffers of its dtype that
                # hold its unsharded parameter: FSDP2 makes both anew at the next one.
                fsdp_param.all_gather_outputs = []
                if hasattr(fsdp_param, "_unsharded_param"):
                    del fsdp_param._unsharded_param
            served.append(found[0])
    return served
