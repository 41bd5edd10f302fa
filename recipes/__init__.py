"""Recipe files shipped with xconv-patch (TOML, per-layer probe budgets)."""
