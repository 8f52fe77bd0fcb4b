"""`configs/` at the top of the repository shows every configuration the package ships."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHIPPED = {  # folder in configs/ -> where the package keeps the files
    "trl": REPO / "grouprl" / "recipes" / "trl",
    "verl": REPO / "grouprl" / "recipes" / "verl",
    "accelerate": REPO / "grouprl" / "recipes" / "accelerate",
    "verl_algorithms": REPO / "grouprl_verl" / "configs",
}


def test_every_shipped_config_is_reachable_from_configs():
    for folder, source in SHIPPED.items():
        link = REPO / "configs" / folder
        assert link.is_dir() and link.resolve() == source.resolve(), f"configs/{folder} should link to {source}"
        assert sorted(p.name for p in link.rglob("*.yaml")) == sorted(p.name for p in source.rglob("*.yaml"))
    package_dirs = {p.parent.resolve() for p in (REPO / "grouprl" / "recipes").rglob("*.yaml")}
    package_dirs |= {p.parent.resolve() for p in (REPO / "grouprl_verl" / "configs").rglob("*.yaml")}
    shown = {s.resolve() for s in SHIPPED.values()}
    hidden = [d for d in package_dirs if d not in shown and not shown & set(d.parents)]
    assert not hidden, f"configuration folders not linked from configs/: {sorted(map(str, hidden))}"
