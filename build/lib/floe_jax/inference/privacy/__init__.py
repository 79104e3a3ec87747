"""Privacy at the exit to the cloud: normalisation, detectors, the policy and the guard.

See `detector` for what is caught, the streaming guarantee and the false-positive rate.
"""

from floe_jax.inference.privacy.detector import (
    ACTIONS,
    TYPES,
    Decision,
    Detector,
    PrivacyDetector,
    PrivacyPolicy,
)
from floe_jax.inference.privacy.guard import GuardedCloud
from floe_jax.inference.privacy.normalize import Normalized, normalize, skeleton
from floe_jax.inference.privacy.patterns import PatternDetector, iban_ok, luhn_ok
from floe_jax.inference.privacy.recorder import SpanCount, count_private_spans
from floe_jax.inference.privacy.registry import RegisteredDetector, classify
from floe_jax.inference.privacy.span import Span, merge_spans

__all__ = [
    "ACTIONS",
    "TYPES",
    "Decision",
    "Detector",
    "GuardedCloud",
    "Normalized",
    "PatternDetector",
    "PrivacyDetector",
    "PrivacyPolicy",
    "RegisteredDetector",
    "Span",
    "SpanCount",
    "classify",
    "count_private_spans",
    "iban_ok",
    "luhn_ok",
    "merge_spans",
    "normalize",
    "skeleton",
]
