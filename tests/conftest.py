from pathlib import Path

import pytest

from devtools.monitoring_stack import prometheus_binary, pushgateway_binary

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` beside the checkout; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent: the real TCGA tables and slides are not available here")
    return SHARED_DATA


@pytest.fixture(scope="session")
def blca_table(shared_data: Path) -> Path:
    path = shared_data / "tcga" / "tcga_blca_all_clean.csv.gz"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A fresh BentoML home and champion pointer; the in-process BentoML singletons point at it."""
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models import ModelStore

    home = tmp_path / "bentoml"
    (home / "models").mkdir(parents=True)
    monkeypatch.setenv("BENTOML_HOME", str(home))
    monkeypatch.setenv("HEALNET_REGISTRY_DIR", str(home))
    with (
        BentoMLContainer.bentoml_home.patch(str(home)),
        BentoMLContainer.model_store.patch(ModelStore(str(home / "models"))),
    ):
        yield home


REQUIRES_PROMETHEUS = pytest.mark.skipif(
    prometheus_binary() is None, reason="prometheus not found: install the Debian/Ubuntu package `prometheus`"
)
REQUIRES_PUSHGATEWAY = pytest.mark.skipif(
    pushgateway_binary() is None,
    reason="the Pushgateway was not found: install the Debian/Ubuntu package `prometheus-pushgateway`",
)
