"""Hostile configuration and names (issue 28, T3/T4/T8/T9): each is one `scan: error:` line naming the
setting or file, before any work, with no traceback."""
from types import SimpleNamespace

import pytest
from conftest import one_error_line

from scan.cli import main
from scan.config import ConfigError, read_config
from scan.config.loading import MAX_BASE_DEPTH
from scan.core.errors import RunError
from scan.use.inference import set_names


@pytest.mark.parametrize("override, key", [("cluster.lr=.nan", "cluster.lr"),
                                           ("augment.crop_min_scale=.inf", "augment.crop_min_scale"),
                                           ("selflabel.threshold=-.inf", "selflabel.threshold"),
                                           ("refine.alpha=.NaN", "refine.alpha")])
def test_nan_and_infinite_settings_are_refused_by_name(override, key, capsys):
    # NaN compares false with every bound, so a range check alone lets it through
    assert main(["config", "show", "--set", override]) == 2
    one_error_line(capsys, key, "finite")
    with pytest.raises(ConfigError, match=f"{key} must be a finite number"):
        read_config("digits", [override])


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "cluster:\n  epochs: 3\n".encode("utf-16")])
def test_a_config_file_that_is_not_utf8_text_is_one_error_naming_it(tmp_path, capsys, content):
    path = tmp_path / "photo.png"
    path.write_bytes(content)
    assert main(["config", "show", "--config", str(path)]) == 2
    one_error_line(capsys, str(path), "UTF-8")


def test_a_loop_free_but_absurdly_deep_base_chain_is_refused(tmp_path, capsys):
    for i in range(MAX_BASE_DEPTH + 5):
        (tmp_path / f"c{i}.yaml").write_text(f"base: {tmp_path / f'c{i + 1}.yaml'}\n")
    (tmp_path / f"c{MAX_BASE_DEPTH + 5}.yaml").write_text("cluster:\n  epochs: 3\n")
    assert main(["config", "show", "--config", str(tmp_path / "c0.yaml")]) == 2
    one_error_line(capsys, "base:", str(MAX_BASE_DEPTH))
    # a chain within the limit still works
    assert read_config(str(tmp_path / "c10.yaml")).cluster.epochs == 3


@pytest.mark.parametrize("text", ["²=x", "٣x=y", "1.5=z", "-1=w"])
def test_a_cluster_id_that_is_not_a_plain_number_is_a_run_error(tmp_path, text):
    run = SimpleNamespace(num_clusters=5, path=lambda *parts: tmp_path.joinpath(*parts), digest=None,
                          run_dir=tmp_path)
    with pytest.raises(RunError, match="must look like CLUSTER=NAME"):
        set_names(run, [text])
    assert not (tmp_path / "names.json").exists()


@pytest.mark.parametrize("env, name", [({"WORLD_SIZE": "two"}, "WORLD_SIZE"),
                                       ({"WORLD_SIZE": "2", "RANK": "-1"}, "RANK"),
                                       ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK"),
                                       ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "x"}, "LOCAL_RANK")])
def test_a_malformed_torchrun_environment_is_one_error_line(tmp_path, capsys, monkeypatch, env, name):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["run", "--out", str(tmp_path / "run"), "--device", "cpu"]) == 2
    one_error_line(capsys, f"environment variable {name}=")
    assert not (tmp_path / "run").exists()   # refused before the run directory is made


def test_fit_on_a_list_of_files_or_an_object_array_says_what_to_pass(tmp_path):
    import numpy as np

    from scan import SCANClustering
    from scan.use.images_in import as_image_tensor
    with pytest.raises(RunError, match=r"folder that holds the images \(fit\('photos/'\)\), not a list of files"):
        SCANClustering(run_dir=tmp_path / "run").fit([tmp_path / "a.png", tmp_path / "b.png"])
    assert not (tmp_path / "run").exists()
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = np.zeros((8, 8), np.uint8), np.zeros((9, 9), np.uint8)
    for images in (ragged, np.array([["a.png"]])):
        with pytest.raises(RunError, match=r"must be uint8 \(0..255\) or float in \[0, 1\], got a (object|<U5) array"):
            as_image_tensor(images)


def test_a_stage_folder_that_is_a_symlink_out_of_the_run_is_never_written_through(tmp_path, capsys):
    import json

    from conftest import TINY

    from scan.core.checkpoint import FORMAT_VERSION
    run, outside = tmp_path / "run", tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "done.json").write_text("{}")
    (outside / "model.pt").write_bytes(b"someone else's")
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"format_version": FORMAT_VERSION}))
    (run / "cluster").symlink_to(outside, target_is_directory=True)
    args = ["run", "--out", str(run), "--restart"] + [a for o in TINY for a in ("--set", o)]
    assert main(args) == 2
    one_error_line(capsys, str(run / "cluster"), "symbolic link")
    assert sorted(p.name for p in outside.iterdir()) == ["done.json", "model.pt"]
    assert (outside / "model.pt").read_bytes() == b"someone else's"


@pytest.mark.parametrize("content, message", [(b"not a torch file at all", "not a PyTorch file of tensors"),
                                              ("list", "holds a list, not a state dict"),
                                              ("dict", "holds a dict, not a state dict")])
def test_a_bad_init_checkpoint_file_is_one_error_naming_it(tmp_path, capsys, content, message):
    import torch
    path = tmp_path / "weights.pt"
    if content == "list":
        torch.save([torch.zeros(1)], path)
    elif content == "dict":
        torch.save({"state_dict": {"epoch": 3}}, path)
    else:
        path.write_bytes(content)
    from conftest import TINY
    args = ["run", "--out", str(tmp_path / "run"), "--set", f"model.init_checkpoint={path}"]
    assert main(args + [a for o in TINY for a in ("--set", o)]) == 2
    one_error_line(capsys, f"model.init_checkpoint={path}", message)


@pytest.mark.parametrize("override, message", [("model.blocks=[1000000]", "model.blocks must be <= 64"),
                                               ("data.image_size=3000", "data.image_size must be <= 2048"),
                                               ("model.width=100000", "model.width must be <= 1024"),
                                               ("cluster.num_heads=100000", "cluster.num_heads must be <= 1000")])
def test_absurd_sizes_are_refused_before_any_work(tmp_path, capsys, override, message):
    # each of these ran for minutes in silence (or until memory ran out) before it was refused
    assert main(["run", "--out", str(tmp_path / "run"), "--set", override]) == 2
    one_error_line(capsys, message)
    assert not (tmp_path / "run").exists()


def test_few_images_get_fewer_neighbours_instead_of_an_error(tmp_path, capsys):
    """16 images in 3 clusters hold about 5 per cluster: the default 20 neighbours would be refused (or reach
    into other clusters); the mine stage takes 16 // (2 * 3) = 2 and says why."""
    import json

    import numpy as np
    np.savez(tmp_path / "few.npz", images=np.random.default_rng(0).integers(0, 255, (16, 8, 8), dtype=np.uint8))
    assert main(["run", "--data", str(tmp_path / "few.npz"), "--num-clusters", "3", "--out", str(tmp_path / "r"),
                 "--set", "pretext.epochs=1", "--set", "cluster.epochs=1", "--set", "selflabel.epochs=1"]) == 0
    record = json.loads((tmp_path / "r" / "mine" / "done.json").read_text())
    assert record["num_neighbors"] == 2 and record["num_neighbors_requested"] == 20
    assert np.load(tmp_path / "r" / "mine" / "neighbors.npy").shape == (16, 2)
    assert "2 neighbours per image, not mine.num_neighbors=20" in capsys.readouterr().err


@pytest.mark.slow
def test_a_hand_set_world_size_without_torchrun_says_what_it_waits_for_and_gives_up(tmp_path):
    """WORLD_SIZE=2 set by hand and nobody else coming: rank 0 (which would host the rendezvous) and rank 1
    (which would connect to it) each say what they wait for, then stop after $SCAN_JOIN_TIMEOUT seconds with
    one error line (no C++ stack trace), leaving no run directory behind; torch alone waits 30 minutes."""
    import os
    import socket
    import subprocess
    import sys
    ranks = {}
    for rank in ("0", "1"):   # side by side, each on its own port: neither has a partner
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "WORLD_SIZE": "2", "RANK": rank, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "SCAN_JOIN_TIMEOUT": "1"}
        env.pop("TORCHELASTIC_RUN_ID", None)
        ranks[rank] = port, subprocess.Popen([sys.executable, "-m", "scan", "run", "--out", str(tmp_path / "run"),
                                              "--device", "cpu"], env=env, stderr=subprocess.PIPE, text=True)
    for rank, (port, proc) in ranks.items():
        _, err = proc.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 2, err
        assert f"RANK={rank} of WORLD_SIZE=2 without torchrun: waiting up to 1 s for the other 1 process(es)" in lines[0]
        assert f"127.0.0.1:{port}" in lines[0] and "unset WORLD_SIZE and RANK" in lines[0]
        assert lines[1].startswith("scan: error: ") and "did not join" in lines[1] and "within 1 s" in lines[1]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("count, extra, message", [
    (1, ["--num-clusters", "3"], "holds 1 image(s): too few to cluster; give at least 2"),
    (1, ["--pretrained", "efficientnet_lite0"], "holds 1 image(s): too few to cluster; give at least 2"),
    (3, [], "3 images are too few to choose the number of clusters"),
])
def test_a_handful_of_images_is_refused_in_the_users_terms(tmp_path, capsys, count, extra, message):
    """Not 'pretext.batch_size must be >= 2' or 'choose.max_clusters=2 ...': settings the user never set."""
    import numpy as np
    np.savez(tmp_path / "few.npz", images=np.random.default_rng(0).integers(0, 255, (count, 8, 8), dtype=np.uint8))
    assert main(["run", "--data", str(tmp_path / "few.npz"), *extra, "--out", str(tmp_path / "r"), "--quiet"]) == 2
    one_error_line(capsys, message)
    assert not (tmp_path / "r").exists()
