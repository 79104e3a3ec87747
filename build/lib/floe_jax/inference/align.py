"""Logit-level vocabulary alignment: the cloud's next-token distribution onto the edge vocabulary.

Shapes: B batch, V edge vocab, W cloud vocab, K listed (top-k) tokens.

Identity for a shared tokenizer. Otherwise a mapping cloud id -> edge id is built once on the host
from token strings (FuseLLM, Wan et al., 2024; PackLLM, Mavromatis et al., 2024):

1. Every token string is normalised to its *surface* text: byte-level BPE symbols (`Ġ` space,
   `Ċ` newline, the whole GPT-2 byte alphabet) are decoded to bytes, sentencepiece `▁` becomes a
   space and `<0xNN>` byte-fallback pieces become that byte. A special token maps to the edge's
   special token of the same spelling (one family's `<|im_start|>` on both sides), else to the
   edge's special token of the same role (bos/eos/unk/pad: the one the tokenizer declares, so a
   Qwen cloud's `<|im_end|>` lands on a Llama 3 edge's declared end of turn `<|eot_id|>`); it is
   never matched as text.
2. Exact match of surface strings first.
3. Fallback (`AlignConfig.fallback`): `"prefix"` (default) maps to the edge token whose surface is
   the longest prefix of the cloud surface, i.e. the first piece the edge would emit on the way to
   the same text; `"edit"` maps to the edge token of minimum Levenshtein distance (FuseLLM's
   MinED), searched among tokens sharing the first character; `"none"` leaves it unmapped.

Probabilities that land on one edge token are summed. Mass on unmapped cloud tokens joins the
tail of a sparse top-k (a dense distribution drops it and renormalises). With sparse top-k (APIs
give k <= 20) the known mass sits on the listed ids and the tail `1 - sum(top-k)` is spread by
`AlignConfig.tail`:

- `"edge"` (default): over the unlisted edge ids in proportion to the edge model's own
  distribution, so the cloud's unknown tail keeps the edge's ranking rather than flattening it.
- `"uniform"`: evenly over the unlisted edge ids.
- `"renorm"`: dropped; the listed mass is renormalised to one.

The aligned output is always log-probs [B, V] over the edge vocabulary (floored at `LOG_FLOOR`
so a log-space mixture stays finite), computed by jittable scatters from arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from floe_jax.config import ConfigError

LOG_FLOOR = -69.0  # log(1e-30): zero probability, kept finite
FALLBACKS = ("prefix", "edit", "none")
TAILS = ("edge", "uniform", "renorm")
_ROLES = ("bos", "eos", "unk", "pad")
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_TOKEN_ID = re.compile(r"^token_id:(-?\d+)$")  # vLLM's `return_tokens_as_token_ids` keys


@dataclasses.dataclass(frozen=True, kw_only=True)
class AlignConfig:
    """How cloud distributions are mapped onto the edge vocabulary (see module docstring)."""

    fallback: str = "prefix"
    tail: str = "edge"

    def __post_init__(self):
        if self.fallback not in FALLBACKS:
            raise ConfigError(f"AlignConfig.fallback={self.fallback!r} is not one of {FALLBACKS}")
        if self.tail not in TAILS:
            raise ConfigError(f"AlignConfig.tail={self.tail!r} is not one of {TAILS}")


# ----------------------------------------------------------------------------- token strings


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's `bytes_to_unicode`: printable stand-in character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def detect_style(vocab: Mapping[str, int]) -> str:
    """`"bytelevel"` (GPT-2 / Llama 3 / Qwen: `Ġ`), `"metaspace"` (sentencepiece: `▁`) or
    `"plain"`, by which marker is more common in the vocabulary."""
    g = sum("Ġ" in t or "Ċ" in t for t in vocab)
    m = sum("▁" in t for t in vocab)
    if g == 0 and m == 0:
        return "plain"
    return "bytelevel" if g >= m else "metaspace"


def surface(token: str, style: str) -> str:
    """The text a token stands for. Undecodable byte fragments are kept as `\\xNN` escapes, so
    two fragments match only when their bytes do."""
    if style == "bytelevel":
        dec = _byte_decoder()
        if all(c in dec for c in token):
            raw = bytes(dec[c] for c in token)
            return raw.decode("utf-8", errors="backslashreplace")
        return token
    if style == "metaspace":
        m = _BYTE_PIECE.match(token)
        if m:
            raw = bytes([int(m.group(1), 16)])
            return raw.decode("utf-8", errors="backslashreplace")
        return token.replace("▁", " ")
    return token


def token_bytes(token: str, style: str) -> bytes:
    """The bytes a token stands for: the exact form of `surface`, as the OpenAI schema's
    `bytes` field carries them (a byte fragment of a UTF-8 character stays a fragment)."""
    if style == "bytelevel":
        dec = _byte_decoder()
        if all(c in dec for c in token):
            return bytes(dec[c] for c in token)
    elif style == "metaspace":
        m = _BYTE_PIECE.match(token)
        if m:
            return bytes([int(m.group(1), 16)])
        return token.replace("▁", " ").encode()
    return token.encode()


@dataclasses.dataclass(frozen=True)
class Vocab:
    """A tokenizer's vocabulary as the aligner sees it.

    Attributes:
      tokens: token string of each id (`""` for holes).
      style: `"bytelevel"`, `"metaspace"` or `"plain"`.
      special: role (`bos`/`eos`/`unk`/`pad`) -> id, for special tokens; other added/special
        tokens are in `special_ids` and never matched as text (only by their whole spelling,
        `by_special`).
    """

    tokens: tuple[str, ...]
    style: str
    special: Mapping[str, int]
    special_ids: frozenset[int]

    @property
    def size(self) -> int:
        return len(self.tokens)

    @functools.cached_property
    def surfaces(self) -> tuple[str, ...]:
        return tuple(surface(t, self.style) for t in self.tokens)

    @functools.cached_property
    def by_surface(self) -> dict[str, int]:
        """Surface -> smallest id with it (special ids excluded)."""
        out: dict[str, int] = {}
        for i, s in enumerate(self.surfaces):
            if i not in self.special_ids and s and s not in out:
                out[s] = i
        return out

    @functools.cached_property
    def by_special(self) -> dict[str, int]:
        """Spelling -> smallest id, of the special tokens."""
        out: dict[str, int] = {}
        for i in sorted(self.special_ids):
            if i < self.size and self.tokens[i]:
                out.setdefault(self.tokens[i], i)
        return out

    def special_id(self, token: str) -> int:
        """The edge id for a special token of the other side: the same spelling, else the same
        role (`special_role`); -1 if neither."""
        i = self.by_special.get(token, -1)
        if i < 0:
            role = special_role(token)
            i = self.special.get(role, -1) if role is not None else -1
        return i

    def lookup(self, token: str, *, is_surface: bool = False) -> int:
        """Id of a token string (raw form, or already-decoded surface text); -1 if absent."""
        s = token if is_surface else surface(token, self.style)
        return self.by_surface.get(s, -1)


_ROLE_KEYS = (
    ("bos", ("<s>", "bos", "begin_of_text", "<|startoftext|>")),
    ("eos", ("</s>", "eos", "endoftext", "end_of_text", "<|im_end|>", "eot")),
    ("unk", ("unk",)),
    ("pad", ("pad",)),
)


def special_role(token: str) -> str | None:
    """The role (`bos`/`eos`/`unk`/`pad`) a special token's spelling names, or None."""
    name = token.lower()
    for role, keys in _ROLE_KEYS:
        if any(k in name for k in keys):
            return role
    return None


def vocab_of(tokenizer, *, size: int | None = None, style: str | None = None) -> Vocab:
    """A `Vocab` from a `tokenizers.Tokenizer`, a Hugging Face tokenizer, or a dict token -> id.

    `size` pads the table to the model's vocab size (models often have more rows than tokens).
    """
    if isinstance(tokenizer, Mapping):
        table, added = dict(tokenizer), {}
    else:
        table = dict(tokenizer.get_vocab())
        added = {}
        dec = getattr(tokenizer, "get_added_tokens_decoder", None) or getattr(
            tokenizer, "added_tokens_decoder", None
        )
        if dec is not None:
            added = dict(dec() if callable(dec) else dec)
    n = max(size or 0, max(table.values(), default=-1) + 1)
    tokens = [""] * n
    for t, i in table.items():
        if i < n:
            tokens[i] = t
    special_ids = {int(i) for i, t in added.items() if getattr(t, "special", True)}
    special: dict[str, int] = {}
    for role in _ROLES:  # the tokenizer's own declaration first (Llama 3's eos is <|eot_id|>)
        i = getattr(tokenizer, f"{role}_token_id", None)
        if isinstance(i, int) and i in special_ids:
            special[role] = i
    for i in sorted(special_ids):
        role = special_role(tokens[i])
        if role is not None and role not in special:
            special[role] = i
    return Vocab(
        tokens=tuple(tokens),
        style=style or detect_style(table),
        special=special,
        special_ids=frozenset(special_ids),
    )


# ----------------------------------------------------------------------------- the mapping


@dataclasses.dataclass(frozen=True)
class VocabMap:
    """cloud id -> edge id, built once on the host.

    Attributes:
      cloud_to_edge: [W] int32 edge id of each cloud id, -1 when unmapped.
      exact: [W] bool, mapped by exact surface match (or special-token role, or identity).
      edge_size: V.
      identity: the two vocabularies are one (alignment is a no-op).
    """

    cloud_to_edge: np.ndarray
    exact: np.ndarray
    edge_size: int
    identity: bool = False

    @property
    def cloud_size(self) -> int:
        return int(self.cloud_to_edge.shape[0])

    def coverage(self) -> dict[str, float]:
        n = max(self.cloud_size, 1)
        mapped = self.cloud_to_edge >= 0
        return {"exact": float(self.exact.sum()) / n, "mapped": float(mapped.sum()) / n}


def identity_map(size: int) -> VocabMap:
    """Shared tokenizer: every id maps to itself."""
    ids = np.arange(size, dtype=np.int32)
    return VocabMap(cloud_to_edge=ids, exact=np.ones(size, bool), edge_size=size, identity=True)


def _levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


class _Fallback:
    """Finds the fallback edge id of one surface string (cached per string)."""

    def __init__(self, edge: Vocab, method: str):
        self.edge, self.method = edge, method
        self.max_len = max((len(s) for s in edge.by_surface), default=0)
        self.by_first: dict[str, list[tuple[str, int]]] = {}
        if method == "edit":
            for s, i in edge.by_surface.items():
                self.by_first.setdefault(s[0], []).append((s, i))

    @functools.lru_cache(maxsize=65536)  # noqa: B019  (one instance per alignment build)
    def __call__(self, s: str) -> int:
        if not s or self.method == "none":
            return -1
        if self.method == "prefix":
            for n in range(min(len(s), self.max_len), 0, -1):
                i = self.edge.by_surface.get(s[:n], -1)
                if i >= 0:
                    return i
            return -1
        best, best_d = -1, None
        for t, i in self.by_first.get(s[0], ()):
            d = _levenshtein(s, t)
            if best_d is None or d < best_d or (d == best_d and i < best):
                best, best_d = i, d
        return best


def build_map(cloud: Vocab, edge: Vocab, config: AlignConfig = AlignConfig()) -> VocabMap:
    """The cloud -> edge id map by token string (exact match, then `config.fallback`)."""
    fb = _Fallback(edge, config.fallback)
    c2e = np.full(cloud.size, -1, np.int32)
    exact = np.zeros(cloud.size, bool)
    roles = {i: r for r, i in cloud.special.items()}
    for i, s in enumerate(cloud.surfaces):
        if i in cloud.special_ids:
            j = edge.by_special.get(cloud.tokens[i], -1)
            if j < 0:
                j = edge.special.get(roles.get(i, ""), -1)
            c2e[i], exact[i] = j, j >= 0
            continue
        j = edge.by_surface.get(s, -1) if s else -1
        if j >= 0:
            c2e[i], exact[i] = j, True
        else:
            c2e[i] = fb(s)
    return VocabMap(cloud_to_edge=c2e, exact=exact, edge_size=edge.size)


class StringMapper:
    """Maps token strings as APIs return them (decoded surface text, or raw vocab spellings, or
    `token_id:N`) to edge ids, on the host, with the same exact-then-fallback rule.

    An id (`token_id=`, or a `token_id:N` key) goes through `vocab_map` when there is one; without
    one it is taken as an edge id (a shared tokenizer) when it is inside the edge vocabulary, and
    is unmapped (-1) otherwise: never matched as text.
    """

    def __init__(self, edge: Vocab, config: AlignConfig = AlignConfig(), vocab_map=None):
        self.edge, self.fb, self.vocab_map = edge, _Fallback(edge, config.fallback), vocab_map

    def __call__(self, token: str, token_id: int | None = None, *, fallback: bool = True) -> int:
        """The edge id of one cloud token; `fallback=False`: exact matches only (-1 otherwise),
        for a token the edge must emit as it is (a proposed token, `http_cloud.propose`)."""
        m = _TOKEN_ID.match(token) if token_id is None else None
        if m:
            token_id = int(m.group(1))
        if token_id is not None:  # an id, never a string to match: mapped, or the edge's own
            if self.vocab_map is not None:
                if 0 <= token_id < self.vocab_map.cloud_size and (
                    fallback or self.vocab_map.exact[token_id]
                ):
                    return int(self.vocab_map.cloud_to_edge[token_id])
                return -1
            return token_id if 0 <= token_id < self.edge.size else -1
        i = self.edge.by_surface.get(token, -1)  # APIs usually send decoded text
        if i < 0:
            i = self.edge.lookup(token)  # or the raw vocab spelling
        if i < 0 and token.startswith("<") and token.endswith(">"):
            # a special token (`</s>`, `<|im_end|>`, ...): the edge's of the same spelling or
            # role, never a piece of its spelling
            return self.edge.special_id(token)
        return i if i >= 0 or not fallback else self.fb(token)


# ----------------------------------------------------------------------------- on the device


def _to_log(p):
    return jnp.where(p > 0, jnp.log(jnp.maximum(p, 1e-30)), LOG_FLOOR)


def align_dense(
    cloud_logp_BW: jax.Array, cloud_to_edge_W: jax.Array | None, edge_size: int
) -> jax.Array:
    """Dense cloud log-probs [B, W] -> edge log-probs [B, V]; `cloud_to_edge_W=None` is identity.

    Mass of unmapped cloud ids is dropped and the rest renormalised (a dense distribution has no
    unknown tail to spread).
    """
    logp = jax.nn.log_softmax(cloud_logp_BW.astype(jnp.float32), axis=-1)
    if cloud_to_edge_W is None:
        return jnp.maximum(logp, LOG_FLOOR)
    seg = jnp.where(cloud_to_edge_W >= 0, cloud_to_edge_W, edge_size)  # unmapped -> a dump slot
    p_BV = jax.vmap(lambda p: jax.ops.segment_sum(p, seg, num_segments=edge_size + 1))(
        jnp.exp(logp)
    )[:, :edge_size]
    p_BV = p_BV / jnp.maximum(p_BV.sum(-1, keepdims=True), 1e-30)
    return _to_log(p_BV)


def align_sparse(
    ids_BK: jax.Array,
    logp_BK: jax.Array,
    valid_BK: jax.Array,
    edge_size: int,
    *,
    tail: str = "edge",
    edge_logp_BV: jax.Array | None = None,
) -> jax.Array:
    """Top-k cloud log-probs, already mapped to edge ids, -> edge log-probs [B, V].

    Args:
      ids_BK: int32 edge id of each listed token, -1 when it did not map.
      logp_BK: the cloud's log-prob of each listed token.
      valid_BK: bool, slot holds a listed token (padding slots are False).
      edge_size: V.
      tail: `"edge"`, `"uniform"` or `"renorm"` (module docstring).
      edge_logp_BV: the edge model's log-probs, for `tail="edge"`.
    """
    p_BK = jnp.where(valid_BK, jnp.exp(logp_BK.astype(jnp.float32)), 0.0)
    mapped = valid_BK & (ids_BK >= 0)
    idx = jnp.where(mapped, ids_BK, edge_size)
    known_BV = jax.vmap(lambda p, i: jnp.zeros(edge_size + 1).at[i].add(p))(
        jnp.where(mapped, p_BK, 0.0), idx
    )[:, :edge_size]
    listed_BV = jax.vmap(lambda m, i: jnp.zeros(edge_size + 1, bool).at[i].max(m))(mapped, idx)[
        :, :edge_size
    ]
    known_mass = known_BV.sum(-1, keepdims=True)
    tail_mass = jnp.clip(1.0 - known_mass, 0.0, 1.0)  # includes listed-but-unmapped mass
    if tail == "renorm":
        p_BV = known_BV / jnp.maximum(known_mass, 1e-30)
    else:
        if tail == "edge":
            if edge_logp_BV is None:
                raise ValueError('tail="edge" needs the edge log-probs')
            shape = jnp.where(listed_BV, 0.0, jnp.exp(edge_logp_BV.astype(jnp.float32)))
        elif tail == "uniform":
            shape = jnp.where(listed_BV, 0.0, 1.0)
        else:
            raise ValueError(f"unknown tail rule {tail!r}; one of {TAILS}")
        shape = shape / jnp.maximum(shape.sum(-1, keepdims=True), 1e-30)
        p_BV = known_BV + tail_mass * shape
        p_BV = p_BV / jnp.maximum(p_BV.sum(-1, keepdims=True), 1e-30)
    return _to_log(p_BV)
