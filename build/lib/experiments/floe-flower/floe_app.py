"""The app's components: the Floe server and device of `experiments.flower`."""

from experiments.flower import client, server

__all__ = ["client", "server"]
