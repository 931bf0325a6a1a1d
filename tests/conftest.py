"""Shared test fixtures: environment for offline runs and the location of ../shared/data."""

import os
from pathlib import Path

import pytest

# Set before any import of albumentations / wandb / jsonargparse (../shared/stack.md, "Pitfalls").
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--shared-data",
        default=os.environ.get("LIT_WSSS_SHARED_DATA", str(REPO_ROOT.parent / "shared" / "data")),
        help="folder holding voc12/, voc12-mini/, voc12-bench/, coco-mini/ (env LIT_WSSS_SHARED_DATA)",
    )


@pytest.fixture(scope="session")
def shared_data(request: pytest.FixtureRequest) -> Path:
    """Path of ../shared/data; the test is skipped when it is absent."""
    path = Path(request.config.getoption("--shared-data"))
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path} (set --shared-data or LIT_WSSS_SHARED_DATA)")
    return path
