import os

# No test may reach a model or data hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from tests.fixtures import write_glue_dir, write_tiny_bert  # noqa: E402


@pytest.fixture(scope="session")
def glue_dir(tmp_path_factory):
    return write_glue_dir(tmp_path_factory.mktemp("glue"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_bert3(tmp_path_factory):
    return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert3"), num_labels=3)
