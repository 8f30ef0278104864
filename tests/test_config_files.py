from pathlib import Path

from fabric.config import load_config

CONFIG = Path(__file__).resolve().parent.parent / "config"


def test_every_shipped_config_file_loads():
    files = sorted(CONFIG.glob("*.toml"))
    assert files
    for path in files:
        assert load_config(path).namespace
