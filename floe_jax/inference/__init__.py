"""Real-time edge-cloud inference: cloud back ends, vocabulary alignment, privacy detector,
router and the jitted fused decode step."""
