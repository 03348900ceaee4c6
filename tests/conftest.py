import pytest

# Tiny settings so a whole pipeline runs in seconds on 2 CPU cores.
TINY = ["model.width=8", "pretext.epochs=2", "pretext.batch_size=128", "cluster.epochs=2",
        "cluster.num_heads=3", "selflabel.epochs=2", "selflabel.threshold=0.5", "mine.num_neighbors=5",
        "quiet=true"]


@pytest.fixture
def tiny_overrides():
    return list(TINY)
