import pytest

from pymorph_edge.model.synthetic_gguf import write_synthetic_llama


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="session")
def mha_model(synthetic_dir):
    return str(write_synthetic_llama(synthetic_dir / "mha.gguf", n_head=4, n_head_kv=4))


@pytest.fixture(scope="session")
def gqa_model(synthetic_dir):
    return str(write_synthetic_llama(synthetic_dir / "gqa.gguf", n_head=8, n_head_kv=2))


@pytest.fixture(scope="session")
def gemma_path():
    from pymorph_edge.model.default_model import gemma3_model_path

    return str(gemma3_model_path())


@pytest.fixture(scope="session")
def smollm2_path():
    from pymorph_edge.model.default_model import smollm2_model_path

    return str(smollm2_model_path())
