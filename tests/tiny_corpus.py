"""The tiny text corpus the training tests run on (the `docs` fixture): ten documents of random words, one file each."""

from __future__ import annotations

import random

import pytest

WORDS = "the cat sat on a mat while dogs ran far away into woods and rivers flowed quietly under old bridges".split()


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    rng = random.Random(0)
    for i in range(10):
        (root / f"d{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 120))) + "\n")
    return root
