"""The methods the demo compares, each with a stable id: what adapters the edge runs, whether and
how it reaches the cloud, and how it decodes.

Every row of `results.json` carries its method's `id` (stable across releases; reports and plots
key on it) beside its display `name`. The kinds:

- `fused`: `generate_fused` with the method's adapters, guard action and `FusedDecodeConfig`
  (edge-only methods have no cloud; cloud-only ones fix the router's w = 0 and wait for every
  reply).
- `router`: the query-level router: each query goes whole to the edge (Floe's federated
  adapters) when the asking client's privacy detector finds a private span in its prompt, to the
  cloud (redacted prompt) otherwise; composed from those two methods' answers.
- `oracle`: the token oracle, the ceiling of any token-level mixer: at each step the gold
  continuation, if either model ranks it first (`experiments.demo.oracle`).
"""

from __future__ import annotations

import dataclasses

from experiments.presets import CENTRAL, FLOE, FLOE_DP, LOCAL, DemoPreset
from experiments.real_presets import RealPreset
from floe_jax.inference import FusionConfig
from floe_jax.inference.align import AlignConfig
from floe_jax.inference.fused import FusedDecodeConfig

NO_DEADLINE_S = 1e6  # methods that always wait for the cloud


@dataclasses.dataclass(frozen=True)
class Method:
    """One compared method.

    Attributes:
      id: stable identifier (`floe`, `query-router`, `edge-fed`, `cloud-redacted`, ...).
      name: what the report shows.
      run: the federated run whose adapters the edge uses (None: the base model).
      cloud: None (edge only), or the guard's action on requests with private spans: `redact`,
        `edge_only` or `allow` (no guard: the privacy-violating reference).
      decode: how `generate_fused` decodes.
      kind: `fused`, `router` or `oracle` (module docstring).
      reference: not a private method (shown for scale; its leaks are expected).
    """

    id: str
    name: str
    run: str | None
    cloud: str | None
    decode: FusedDecodeConfig
    kind: str = "fused"
    reference: bool = False


def methods(preset: DemoPreset | RealPreset, runs: set[str]) -> list[Method]:
    """Every evaluated method, in report order; `runs` are the federated runs that exist."""
    ev = preset.eval
    guard, fused = ev.policy.action, ev.decode
    waits = dataclasses.replace(fused, deadline_s=NO_DEADLINE_S)
    # the cloud alone: its listed top-k renormalised, so no edge distribution fills its tail
    alone = FusionConfig(gate="fixed", fixed_w=0.0, align=AlignConfig(tail="renorm"))
    cloud_only = dataclasses.replace(waits, fusion=alone)

    def fixed(w):
        return dataclasses.replace(fused, fusion=dataclasses.replace(
            fused.fusion, gate="fixed", fixed_w=w))  # fmt: skip

    ms = [Method("edge-base", "edge base model", None, None, waits)]
    if LOCAL in runs:
        ms.append(Method("edge-local", "local-only LoRA (each client alone)", LOCAL, None, waits))
    ms += [
        Method("edge-fed", "Floe's federated LoRA, no fusion (= fixed w=1)", FLOE, None, waits),
        Method("cloud-redacted", "cloud only, redacted prompt", None, "redact", cloud_only),
        Method("cloud-full", "cloud only, full private context (violates privacy)", None,
               "allow", cloud_only, reference=True),
        Method("query-router", "query-level router (private → edge, else cloud)", FLOE, guard,
               waits, kind="router"),
        Method("proxy-tuning", "proxy-tuning (Floe's adapters)", FLOE, guard,
               dataclasses.replace(fused, fusion=dataclasses.replace(fused.fusion,
                                                                     gate="proxy"))),
        Method("mix-0.5", "fixed-weight mix w=0.5 (Floe's adapters)", FLOE, guard, fixed(0.5)),
        Method("floe-w0", "Floe, fixed w=0 (cloud)", FLOE, guard,
               dataclasses.replace(fused, fusion=alone)),
    ]  # fmt: skip
    for name in preset.fed.baseline_runs():
        ms.append(Method(f"{name}-fusion", f"{name} LoRA + fusion (no clustering)", name,
                         guard, fused))  # fmt: skip
    ms.append(Method(FLOE, f"Floe (clustered LoRA, detector, {fused.fusion.gate} gate, deadline)",
                     FLOE, guard, fused))  # fmt: skip
    if guard != "edge_only":
        ms.append(Method("floe-edge-only", "Floe, privacy action edge_only", FLOE, "edge_only",
                         fused))  # fmt: skip
    if ev.ablations:
        ms.append(Method("floe-no-deadline", "Floe, no deadline", FLOE, guard, waits))
        other = "entropy" if fused.fusion.gate != "entropy" else "edge"
        ms.append(Method(f"floe-gate-{other}", f"Floe, router gate {other}", FLOE, guard,
                         dataclasses.replace(fused, fusion=dataclasses.replace(
                             fused.fusion, gate=other))))  # fmt: skip
    if FLOE_DP in runs:
        ms.append(Method(FLOE_DP, "Floe + client-level DP", FLOE_DP, guard, fused))
    if CENTRAL in runs:
        name = "centralized LoRA per task on pooled data + fusion (not private)"
        ms.append(Method("centralized", name, CENTRAL, guard, fused, reference=True))
    if ev.oracle:
        ms.append(Method("oracle", "token oracle (either model's top token, gold-guided)", FLOE,
                         guard, fused, kind="oracle", reference=True))  # fmt: skip
    return ms
