"""Test session set-up: CPU only, 8 fake devices so mesh tests run the same code path as 8 GPUs."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
