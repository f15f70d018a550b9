"""Test setup: eight fake CPU devices, so sharding tests can build real meshes.

The flag must be set before jax is first imported; unsharded computations still run on
device 0 exactly as on a one-device machine.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
