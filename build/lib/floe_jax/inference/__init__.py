"""Real-time edge-cloud inference: cloud back ends, vocabulary alignment, privacy detector,
router, the jitted fused decode step and the generation loop under a deadline."""

from floe_jax.inference.align import AlignConfig, VocabMap, build_map, identity_map
from floe_jax.inference.cloud import CloudBackend, CloudDistribution, CloudError, LocalCloud
from floe_jax.inference.deadline import RealClock, SimClock, SimulatedNetwork
from floe_jax.inference.fused import FusedDecodeConfig, FusedResult, generate_fused
from floe_jax.inference.http_cloud import HTTPCloud
from floe_jax.inference.privacy import GuardedCloud, PrivacyDetector, PrivacyPolicy
from floe_jax.inference.router import FusionConfig, edge_weight, fuse, proxy_tuning
from floe_jax.inference.server import serve_cloud
from floe_jax.inference.step import fused_step

__all__ = [
    "AlignConfig",
    "CloudBackend",
    "CloudDistribution",
    "CloudError",
    "FusedDecodeConfig",
    "FusedResult",
    "FusionConfig",
    "GuardedCloud",
    "HTTPCloud",
    "LocalCloud",
    "PrivacyDetector",
    "PrivacyPolicy",
    "RealClock",
    "SimClock",
    "SimulatedNetwork",
    "VocabMap",
    "build_map",
    "edge_weight",
    "fuse",
    "fused_step",
    "generate_fused",
    "identity_map",
    "proxy_tuning",
    "serve_cloud",
]
