"""Seeded fuzzing of a finished run's artifacts (issue 28): randomly damaged copies of every kind of
file a run holds go to `predict`, `export`, `report` and a rerun. Each command ends with exit 0 or
one `scan: error:` line, never a traceback, and nothing outside the run directory is touched."""
import json
import random
import shutil

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image
from sklearn.datasets import load_digits

from scan.rundir.directory import LOCK_FILE

CASES = 12   # bounded: each case runs four commands on a tiny run



@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from conftest import TINY
    base = tmp_path_factory.mktemp("fuzz")
    digits = load_digits()
    np.savez(base / "digits.npz", images=np.uint8(digits.images[:200] * 255 / 16), labels=digits.target[:200])
    Image.fromarray(np.uint8(digits.images[-1] * 255 / 16)).save(base / "seven.png")
    args = ["run", "--data", base / "digits.npz", "--num-clusters", 4, "--out", base / "run"]
    assert run_cli(*args, *[a for o in TINY for a in ("--set", o)]) == 0
    return base


def _damages(rng: random.Random, outside):
    """name -> function(path) that damages one file in place (or swaps a link to `outside` in)."""
    def truncate(p):
        p.write_bytes(p.read_bytes()[: rng.randrange(0, max(1, p.stat().st_size))])

    def flip(p):
        data = bytearray(p.read_bytes())
        for _ in range(8):
            if data:
                data[rng.randrange(len(data))] ^= 0xFF
        p.write_bytes(bytes(data))

    def wrong_json_type(p):
        p.write_text(json.dumps(rng.choice([[], "text", 3, None, {"unexpected": [1, 2]}])))

    def wrong_shape(p):
        np.save(p, np.zeros(rng.choice([(3,), (2, 2, 2), (0, 5)]), dtype=rng.choice([np.float32, np.int64])))

    def torch_junk(p):
        torch.save(rng.choice([[1, 2], {"key": "x"}, torch.zeros(3)]), p)

    def link_outside(p):
        p.unlink()
        p.symlink_to(outside / "victim.bin")
    return {"truncate": truncate, "flip": flip, "wrong_json_type": wrong_json_type, "wrong_shape": wrong_shape,
            "torch_junk": torch_junk, "link_outside": link_outside}


def _applies(damage: str, path) -> bool:
    suffix = path.suffix
    return {"wrong_json_type": suffix == ".json", "wrong_shape": suffix == ".npy",
            "torch_junk": suffix == ".pt"}.get(damage, True)


@pytest.mark.parametrize("seed", range(CASES))
def test_a_randomly_damaged_artifact_never_gives_a_traceback_or_a_write_outside_the_run(trained, tmp_path, capsys,
                                                                                        seed):
    rng = random.Random(seed)
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run, ignore=shutil.ignore_patterns(LOCK_FILE))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.bin").write_bytes(b"not ours")
    files = sorted(p for p in run.rglob("*") if p.is_file() and p.suffix in (".json", ".pt", ".npy", ".npz", ".yaml", ".csv"))
    damages = _damages(rng, outside)
    path = rng.choice(files)
    name = rng.choice([d for d in damages if _applies(d, path)])
    damages[name](path)
    commands = [("predict", run, trained / "seven.png"), ("export", run, "--out", tmp_path / "model.pt"),
                ("report", run), ("run", "--out", run)]
    for command in commands:
        code = run_cli(*command)
        err = capsys.readouterr().err
        assert "Traceback" not in err, (name, path, command, err[-2000:])
        errors = [line for line in err.splitlines() if line.startswith("scan: error:")]
        assert code in (0, 2) and len(errors) == (code == 2), (name, path, command, code, err[-2000:])
    assert sorted(p.name for p in outside.iterdir()) == ["victim.bin"]
    assert (outside / "victim.bin").read_bytes() == b"not ours"
