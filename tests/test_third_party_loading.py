"""The third-party layout table imports lightning_gc.layouts: it must load as the first import, too."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_third_party_entries_load_lazily_and_users_entries_win() -> None:
    script = textwrap.dedent(
        """
        import sys, types
        from torch import nn
        import lightning_gc.layouts as layouts
        table = types.ModuleType("lightning_gc.third_party_layouts")
        sys.modules["lightning_gc.third_party_layouts"] = table
        table.THIRD_PARTY_LAYOUTS = (layouts.LayerLayout("vendor.layers.Dense", "w", out_dims=(1,)),)
        registry = layouts.LayoutRegistry(layouts.BUILTIN_LAYOUTS, deferred=layouts._third_party)
        user = layouts.LayerLayout("vendor.layers.Dense", "w", out_dims=None, reason="mine")
        registry.add(user)  # registered before the table is read: still wins
        Dense = type("Dense", (nn.Module,), {"__module__": "vendor.layers"})
        assert registry.entry(Dense(), "w") == user, registry.entry(Dense(), "w")
        registry.remove(user)
        assert registry.entry(Dense(), "w").out_dims == (1,)
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
