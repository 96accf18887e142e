"""Replay the coverage-guided fuzzing corpus (fuzz/corpus/) through the core on every run:
each input gives events, never an exception (see fuzz/fuzz_session.py)."""

import os

import pytest
from harness import check  # fuzz/harness.py: fuzz/ is on pytest's pythonpath (pyproject.toml)

FUZZ = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fuzz")

CORPUS = os.path.join(FUZZ, "corpus", "session")
INPUTS = sorted(os.listdir(CORPUS))


def test_the_corpus_is_there():
    assert len(INPUTS) >= 50


@pytest.mark.parametrize("name", INPUTS)
def test_corpus_input(name):
    with open(os.path.join(CORPUS, name), "rb") as f:
        check(f.read())
