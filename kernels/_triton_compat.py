"""Compatibility fix for the Triton 3.6 CPU interpreter (``TRITON_INTERPRET=1``) with NumPy >= 2.

The 3.6 interpreter turns a scalar kernel argument used as a loop bound (``range(0, T, BLOCK)``)
into an int with ``int(array_of_shape_1)``, which NumPy 2 rejects ("only 0-dimensional arrays can
be converted to Python scalars"); Triton >= 3.7 squeezes the array first. ``install()`` wraps the
interpreter's tensor patching to do the same. It changes nothing on GPUs or when the interpreter
already works, and is idempotent. Import-safe without Triton only through ``install()`` (lazy).
"""

from __future__ import annotations

import os


def install() -> None:
    """Patch ``triton.runtime.interpreter`` (only under TRITON_INTERPRET=1, only when needed)."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_scalar_index_fix", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._scalar_index_fix = True
    interpreter._patch_lang_tensor = patched
