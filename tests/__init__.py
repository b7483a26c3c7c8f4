"""
Tests for VendePass (run with trial: C{trial tests}).
"""

from hypothesis import HealthCheck, settings

# One derandomized profile for CI, as Twisted's own suite does: the same
# examples every run, no deadline on a shared noisy machine.
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile("ci")
