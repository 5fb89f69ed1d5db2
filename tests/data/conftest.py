"""Fixtures of the data pipeline tests."""

import datasets
import huggingface_hub.constants
import pytest
from data_helpers import random_documents, write_texts


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test reaches for the network: the Hugging Face hub refuses at once."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """40 distinct random documents, one text file each: ``(documents, directory)``."""
    directory = tmp_path_factory.mktemp("corpus")
    documents = random_documents(40)
    write_texts(directory / "texts", documents)
    return documents, directory
