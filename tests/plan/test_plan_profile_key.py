"""The machine profile's cache key follows the native kernels it was measured with."""

from __future__ import annotations

from moeinfer.kernels.native import build
from moeinfer.planning.profile import machine_key, native_kernels_stamp, profile_path


def test_profile_key_changes_with_the_native_kernels(tmp_path, monkeypatch):
    lib = tmp_path / "libmoeinfer_native.so"
    monkeypatch.setenv("MOEINFER_NATIVE_LIB", str(lib))
    monkeypatch.setenv("MOEINFER_CACHE_DIR", str(tmp_path / "cache"))
    assert native_kernels_stamp() == "none"  # not built: the torch paths are measured
    without = machine_key("cpu")
    lib.write_bytes(b"")
    lib.with_suffix(".stamp").write_text(build._stamp() + "\n")  # built from today's sources
    assert native_kernels_stamp() == build._stamp()
    built = machine_key("cpu")
    assert built != without and profile_path("cpu").name == f"cpu-{built}.json"
    lib.with_suffix(".stamp").write_text("0123456789abcdef\n")  # built from older sources: not loaded
    assert native_kernels_stamp() == "none" and machine_key("cpu") == without
