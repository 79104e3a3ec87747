"""What travels between the Floe server and a device: a LoRA adapter's live factors as numpy
arrays, never its padding, the base weights or the data.

A client's adapter is padded to the run's rank R on every module and layer (`LoRA`), with a
mask saying which (layer, slot) pairs are live: the layers `fed.lora.layers` adapts and the
client's first r slots. On the wire it is `a.<module>` [L_live, I, r] and `b.<module>`
[L_live, r, O] for each module with a live layer; both ends rebuild the padded adapter from the
mask of the client's rank (`client_template`), so the payload holds exactly the parameters
floe_jax counts as communicated (`rules._count`: live slots x (I + O), 4 bytes each).

`array_record`, `message_arrays` and `message_config` put those arrays and a round's settings
into Flower messages and take them out (so this module needs `flwr`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flwr.app import Array, ArrayRecord, Message

from floe_jax.config import ModelConfig
from floe_jax.federated.config import FedConfig
from floe_jax.federated.rounds import client_start, init_global_loras
from floe_jax.lora import LoRA


class WireError(ValueError):
    """A message between server and device does not hold what the protocol says (the message
    names the client, tensor and shape)."""


def _live(mask_LR: np.ndarray) -> tuple[np.ndarray, int]:
    """(live layer indices, live slot count) of one module's [L, R] mask."""
    mask_LR = np.asarray(mask_LR)
    layers = np.flatnonzero(mask_LR.any(-1))
    r = int(mask_LR.sum(-1).max()) if layers.size else 0
    return layers, r


def live_factors(lora: LoRA) -> dict[str, np.ndarray]:
    """One client's adapter (no leading axis, or a leading axis of 1) as `{"a.<m>": [L_live, I,
    r], "b.<m>": [L_live, r, O]}` float arrays, modules without a live layer left out."""
    one = jax.tree.map(
        lambda x: np.asarray(x[0]) if np.ndim(lora.scale) == 1 else np.asarray(x), lora
    )
    out = {}
    for m in one.a:
        layers, r = _live(one.mask[m])
        if not layers.size:
            continue
        out[f"a.{m}"] = np.ascontiguousarray(one.a[m][layers][:, :, :r])
        out[f"b.{m}"] = np.ascontiguousarray(one.b[m][layers][:, :r, :])
    return out


def from_live(arrays: dict[str, np.ndarray], template: LoRA, *, who: str) -> LoRA:
    """The padded adapter [1] holding `arrays` (`live_factors`) on `template`'s live slots (its
    mask and scale kept, every other entry zero).

    Args:
      arrays: the received factors.
      template: the client's adapter structure [1] at its rank (`client_template`, or the
        server's `client_start` for that client).
      who: names the sender in errors ("client 3").

    Raises:
      WireError: a factor missing, unexpected, of another shape or not finite-typed float.
    """
    expect = {}
    for m in template.a:
        layers, r = _live(np.asarray(template.mask[m][0]))
        if not layers.size:
            continue
        _, _, I, R = template.a[m].shape
        O = template.b[m].shape[-1]
        expect[f"a.{m}"] = (m, "a", layers, (layers.size, I, r))
        expect[f"b.{m}"] = (m, "b", layers, (layers.size, r, O))
    extra = sorted(set(arrays) - set(expect))
    missing = sorted(set(expect) - set(arrays))
    if extra or missing:
        raise WireError(
            f"{who}: adapter tensors {', '.join(missing) or '-'} missing, "
            f"{', '.join(extra) or '-'} unexpected"
        )
    a = {m: np.zeros(v.shape, np.float32) for m, v in template.a.items()}
    b = {m: np.zeros(v.shape, np.float32) for m, v in template.b.items()}
    for name, (m, part, layers, shape) in expect.items():
        x = np.asarray(arrays[name])
        if x.shape != shape or not np.issubdtype(x.dtype, np.floating):
            raise WireError(
                f"{who}: tensor {name} is {x.dtype}{list(x.shape)}, expected float{list(shape)}"
            )
        r = shape[2] if part == "a" else shape[1]
        if part == "a":
            a[m][0, layers, :, :r] = x
        else:
            b[m][0, layers, :r, :] = x
    return LoRA(
        a={m: jnp.asarray(v) for m, v in a.items()},
        b={m: jnp.asarray(v) for m, v in b.items()},
        mask=template.mask,
        scale=template.scale,
    )


def client_template(cfg: ModelConfig, fed: FedConfig, rank: int) -> LoRA:
    """A zero adapter [1] with the mask and scale a client of true rank `rank` trains with
    (`client_start` of a zero global adapter): what a device rebuilds received factors on."""
    shapes = jax.eval_shape(lambda: init_global_loras(cfg, fed))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return client_start(zeros, jnp.zeros((1,), jnp.int32), jnp.asarray([rank], jnp.int32), fed)


def nbytes(arrays: dict[str, np.ndarray]) -> int:
    """Bytes of a payload's tensors (the factors' data, not Flower's framing)."""
    return int(sum(np.asarray(x).nbytes for x in arrays.values()))


def message_arrays(msg: Message) -> dict[str, np.ndarray]:
    """The named arrays a Flower message carries in its "arrays" record ({} without one)."""
    rec = msg.content.array_records.get("arrays")
    return {} if rec is None else {k: v.numpy() for k, v in rec.items()}


def message_config(msg: Message) -> dict:
    """The settings a Flower message carries in its "config" record ({} without one)."""
    rec = msg.content.config_records.get("config")
    return {} if rec is None else dict(rec)


def array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Named numpy arrays as the record a Flower message carries."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
