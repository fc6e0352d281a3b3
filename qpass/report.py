"""``qpass.report``: every site of a compiled model, what it is, how it is quantized or why not."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from qpass.capture import state_of
from qpass.passes.kinds import meta_value
from qpass.passes.plan import SitePlan


@dataclass
class Report:
    recipe: str
    rows: list[dict] = field(default_factory=list)  # one per site, in the order sites were found
    notes: list[str] = field(default_factory=list)

    @property
    def quantized(self) -> list[dict]:
        return [row for row in self.rows if row["quantized"]]

    @property
    def excluded(self) -> list[dict]:
        return [row for row in self.rows if not row["quantized"]]

    def __getitem__(self, site: str) -> dict:
        for row in self.rows:
            if row["site"] == site:
                return row
        raise KeyError(f"no site {site!r}; sites: {', '.join(r['site'] for r in self.rows)}")

    def __str__(self) -> str:
        header = ("site", "kind", "K", "quantization")
        lines = [(r["site"], _kind(r), _reduction(r), _describe(r)) for r in self.rows]
        widths = [max(len(line[i]) for line in [header, *lines]) for i in range(3)]
        table = [
            f"qpass report: recipe {self.recipe}, {len(self.quantized)} of {len(self.rows)} sites quantized",
            *(f"note: {note}" for note in self.notes),
            "  ".join(h.ljust(w) for h, w in zip(header, [*widths, 0])).rstrip(),
        ]
        table += ["  ".join(c.ljust(w) for c, w in zip(line, [*widths, 0])).rstrip() for line in lines]
        return "\n".join(table)


def _kind(row: dict) -> str:
    return row["kind"] if row["experts"] is None else f"{row['kind']} ({row['experts']} experts)"


def _reduction(row: dict) -> str:
    """K, and the input channels outlier channel splitting added (``4096+82``)."""
    if row["K"] is None:
        return ""
    return f"{row['K']}+{row['extra_channels']}" if row["extra_channels"] else str(row["K"])


def _describe(row: dict) -> str:
    """``role=format`` per operand role (``gemm.role=format`` only where the GEMMs of a role
    differ), which GEMM runs them, then what the rotation and splitting passes did."""
    notes = "".join(f"; {note}" for note in row["notes"])
    if not row["quantized"]:
        return f"{'not quantized' if row['kind'] == 'module' else 'excluded'}: {row['reason']}{notes}"
    by_role: dict[str, dict[str, str]] = {}
    for key, fmt in row["formats"].items():
        *product, gemm, role = key.split(".")
        by_role.setdefault(".".join([*product, role]), {})[gemm] = fmt
    parts = []
    for role, per_gemm in by_role.items():
        if len(set(per_gemm.values())) == 1:
            parts.append(f"{role}={next(iter(per_gemm.values()))}")
        else:
            parts += [f"{gemm}.{role}={fmt}" for gemm, fmt in per_gemm.items()]
    gemm = f"; gemm: {row['gemm']}" if row["gemm"] else ""
    return " ".join(parts) + gemm + notes


def _row(plan: SitePlan) -> dict:
    site = plan.site
    formats: dict[str, str] = {}
    for product, name in zip(plan.products, site.op.product_names):
        formats.update(
            {(f"{name}." if name else "") + key: value for key, value in product.formats().items()})
    return {
        "site": plan.name,
        "kind": site.kind,
        "module": site.module,
        "K": site.reduction,
        "roles": site.roles,
        "quantized": plan.excluded is None,
        "formats": formats,
        "reason": plan.excluded,
        "extra_channels": plan.extra_channels,
        "backend": plan.backend or None,  # which implementation runs it (None: excluded)
        "gemm": plan.gemms or None,  # which GEMM runs each of its GEMMs (None: excluded)
        "notes": list(plan.notes),
        "experts": _experts(site),  # how many experts an expert site's weight holds (None: not one)
    }


def _experts(site) -> int | None:
    weight = meta_value(site.weights[-1]) if site.op.family == "experts" and site.weights else None
    return None if weight is None else weight.shape[0]


def report(model: nn.Module) -> Report:
    """The per-site table of a model compiled by :func:`qpass.compile` (print it, or read ``.rows``)."""
    state = state_of(model, "qpass.report")
    notes = ([state.recipe.notes] if state.recipe.notes else []) + state.notes
    if not state.graphs_captured:
        notes.append("no graph captured yet: sites are found when the model first runs")
    rows = [_row(plan) for plan in state.plans.values()]
    rows += [_unrecognized_row(module, why) for module, why in state.unrecognized.items()]
    return Report(state.recipe.name, rows, notes)


def _unrecognized_row(module: str, why: str) -> dict:
    """A module whose GEMMs qpass did not find (an expert layout it does not know): not quantized."""
    return {"site": module, "kind": "module", "module": module, "K": None, "roles": (), "quantized": False,
            "formats": {}, "reason": why, "extra_channels": 0, "backend": None,
            "gemm": None, "notes": [], "experts": None}
