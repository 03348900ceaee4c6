"""The scikit-learn estimator: fit/predict contracts, inputs, persistence, errors."""
import argparse
import inspect
import pickle
import warnings

import joblib
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted

from scan import SCANClustering
from scan.config import ConfigError
from scan.data import DataError
from scan.report import write_report
from scan.use.inference import RunError

NUM_CLUSTERS = 5


@pytest.fixture(scope="module")
def digits():
    """300 digits as (N, 8, 8) uint8, the way a user would pass an image array; read-only, as a
    memory-mapped array from joblib would be (scikit-learn's check_readonly_memmap_input)."""
    images = np.uint8(load_digits().images[:300] * 255 / 16)
    images.setflags(write=False)
    return images


def tiny_overrides() -> dict:
    """conftest's tiny settings as an `overrides` dict in the flat spelling ({'cluster__epochs': 2});
    quiet is the estimator's own parameter (True by default), not an override."""
    from conftest import TINY
    overrides = {}
    for text in TINY:
        key, value = text.split("=", 1)
        if key != "quiet":
            overrides[key.replace(".", "__")] = yaml.safe_load(value)
    return overrides


def tiny(**params) -> SCANClustering:
    return SCANClustering(**{"n_clusters": NUM_CLUSTERS, "overrides": tiny_overrides(), **params})


@pytest.fixture(scope="module")
def fit_record(digits):
    """One fit, with what the estimator looked like before it."""
    estimator = tiny()
    overrides = estimator.overrides
    params_hash = joblib.hash(estimator.get_params())
    attributes = set(vars(estimator))
    assert not estimator.__sklearn_is_fitted__()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        returned = estimator.fit(digits, np.arange(len(digits)))   # y is accepted and ignored
    assert not [w for w in caught if "not writable" in str(w.message)]
    return {"estimator": estimator, "returned": returned, "overrides": overrides, "params_hash": params_hash,
            "attributes": attributes}


@pytest.fixture(scope="module")
def fitted(fit_record):
    return fit_record["estimator"]


# ------------------------------------------------------------------ scikit-learn's own checks
#
# sklearn.utils.estimator_checks feeds 2-D float tables (make_blobs and the like). The estimator's
# tags say so (input_tags.two_d_array=False, three_d_array=True), so check_estimator /
# parametrize_with_checks yield nothing but check_estimator_cloneable for it; the checks are
# called one by one instead.
# RUN_CHECKS need no data or refuse it the way scikit-learn expects; every other check that
# scikit-learn would run on a clusterer is in SKIPPED_CHECKS with the reason, and where the
# property applies to images, the test named there checks it on images.

RUN_CHECKS = [
    "check_estimator_cloneable",
    "check_estimator_tags_renamed",
    "check_valid_tag_types",
    "check_estimator_repr",
    "check_no_attributes_set_in_init",
    "check_mixin_order",
    "check_parameters_default_constructible",
    "check_get_params_invariance",
    "check_set_params",
    "check_do_not_raise_errors_in_init_or_set_params",
    "check_estimators_unfitted",     # predict/predict_proba raise NotFittedError before looking at X
    "check_fit1d",                   # a 1-D X is refused with a ValueError (RunError is one)
]

TABULAR = "feeds a 2-D table, which is not an image batch; "
SKIPPED_CHECKS = {
    "check_fit_score_takes_y": TABULAR + "fit(X, y) and fit_predict(X, y) on images: fit_record, "
                               "test_fit_then_predict_equals_fit_predict...",
    "check_estimators_overwrite_params": TABULAR + "on images: test_fit_keeps_parameters_and_adds_only_learned_"
                                         "attributes",
    "check_dont_overwrite_parameters": TABULAR + "on images: test_fit_keeps_parameters_and_adds_only_learned_"
                                       "attributes",
    "check_estimators_fit_returns_self": TABULAR + "on images: test_fit_keeps_parameters_and_adds_only_learned_"
                                         "attributes",
    "check_readonly_memmap_input": TABULAR + "every fit and predict here gets a read-only array (digits fixture)",
    "check_n_features_in_after_fitting": "returns at once for an estimator without 2-D input (would pass "
                                         "vacuously); images of the wrong size: test_user_errors_are_one_line",
    "check_positive_only_tag_during_fit": TABULAR + "negative values are not pixel values",
    "check_estimators_dtypes": TABULAR + "image dtypes (uint8, float in [0, 1], int32 refused): "
                               "test_predict_proba_..., test_user_errors_are_one_line",
    "check_complex_data": TABULAR + "complex images are refused: test_user_errors_are_one_line",
    "check_dtype_object": TABULAR + "object arrays are not images",
    "check_estimators_empty_data_messages": TABULAR + "an empty image batch: test_user_errors_are_one_line",
    "check_pipeline_consistency": TABULAR + "(score/transform through a Pipeline; the estimator has neither)",
    "check_estimators_nan_inf": TABULAR + "NaN/inf images in fit and predict: test_user_errors_are_one_line",
    "check_estimator_sparse_tag": TABULAR + "sparse matrices are not images",
    "check_estimator_sparse_array": TABULAR + "sparse arrays are not images",
    "check_estimator_sparse_matrix": TABULAR + "sparse matrices are not images",
    "check_estimators_pickle": TABULAR + "on images: test_pickled_estimator_predicts_the_same",
    "check_array_api_input": TABULAR + "the estimator works on torch tensors itself, not through the array API",
    "check_f_contiguous_array_estimator": TABULAR + "Fortran-ordered images: test_predict_proba_...",
    "check_clusterer_compute_labels_predict": "only for estimators with a compute_labels parameter (vacuous)",
    "check_clustering": TABULAR + "(expects good clusters of 2-D blobs); labels_ == fit_predict, ids in range: "
                        "test_fit_then_predict_equals_fit_predict...",
    "check_estimators_partial_fit_n_features": "only for estimators with partial_fit (vacuous)",
    "check_non_transformer_estimators_n_iter": "only for estimators with max_iter (vacuous); the epochs are "
                                               "config fields",
    "check_methods_sample_order_invariance": TABULAR + "on images: test_predict_does_not_depend_on_order_batch_or_"
                                             "state",
    "check_methods_subset_invariance": TABULAR + "on images: test_predict_does_not_depend_on_order_batch_or_state",
    "check_fit2d_1sample": TABULAR + "(a 2-D array is refused outright: test_user_errors_are_one_line)",
    "check_fit2d_1feature": TABULAR + "(a 2-D array is refused outright: test_user_errors_are_one_line)",
    "check_fit2d_predict1d": TABULAR + "(a 1-D or 2-D array is refused outright: test_user_errors_are_one_line)",
    "check_dict_unchanged": TABULAR + "on images: test_predict_does_not_depend_on_order_batch_or_state",
    "check_fit_idempotent": TABULAR + "on images: test_fit_then_predict_equals_fit_predict...",
    "check_fit_check_is_fitted": TABULAR + "on images: test_fit_keeps_parameters_and_adds_only_learned_attributes",
    "check_n_features_in": TABULAR + "on images (n_features_in_ = C*H*W): test_fit_keeps_parameters_and_adds_"
                           "only_learned_attributes, test_fit_on_a_folder...",
}


@pytest.mark.parametrize("check", RUN_CHECKS)
def test_sklearn_estimator_check(check):
    from sklearn.utils import estimator_checks
    if not hasattr(estimator_checks, check):
        pytest.skip(f"{check} is not in this scikit-learn version")
    getattr(estimator_checks, check)("SCANClustering", tiny())


def test_every_sklearn_check_is_run_or_skipped_with_a_reason():
    """The lists above name exactly the checks scikit-learn has for a clusterer like this one."""
    import functools

    from sklearn.utils import estimator_checks
    if not hasattr(estimator_checks, "estimator_checks_generator"):
        pytest.skip("scikit-learn < 1.6 has no estimator_checks_generator")

    class AsIfTabular(SCANClustering):   # only to list the checks: with image tags sklearn yields none
        def __sklearn_tags__(self):
            tags = super().__sklearn_tags__()
            tags.input_tags.two_d_array = True
            return tags

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # with the image tags, sklearn yields only check_estimator_cloneable
        assert len(list(estimator_checks.estimator_checks_generator(tiny(), legacy=True))) <= 1
        generated = {check.func.__name__ if isinstance(check, functools.partial) else check.__name__
                     for _, check in estimator_checks.estimator_checks_generator(AsIfTabular(), legacy=True)}
    assert not set(RUN_CHECKS) & set(SKIPPED_CHECKS)
    assert generated == set(RUN_CHECKS) | set(SKIPPED_CHECKS)


# ------------------------------------------------------------------ parameters

def test_constructor_takes_explicit_parameters_and_keeps_them_unchanged():
    names = list(inspect.signature(SCANClustering).parameters)
    assert names == ["n_clusters", "config", "pretrained", "overrides", "seed", "device", "run_dir", "quiet"]
    overrides = {"cluster": {"epochs": 5}}
    estimator = SCANClustering(n_clusters=3, overrides=overrides, seed=7)
    assert estimator.overrides is overrides and estimator.seed == 7
    assert repr(estimator) == "SCANClustering(n_clusters=3, overrides={'cluster': {'epochs': 5}}, seed=7)"


def test_set_params_reaches_config_fields_without_touching_the_callers_dict():
    caller = {"cluster__epochs": 2, "model": {"width": 8}}
    estimator = SCANClustering(overrides=caller)
    assert estimator.set_params(cluster__epochs=5, selflabel__enabled=False, seed=3) is estimator
    assert caller == {"cluster__epochs": 2, "model": {"width": 8}}
    assert estimator.overrides == {"cluster": {"epochs": 5}, "model": {"width": 8}, "selflabel": {"enabled": False}}
    params = estimator.get_params()
    assert (params["cluster__epochs"], params["model__width"], params["selflabel__enabled"], params["seed"]) == (
        5, 8, False, 3)
    assert "cluster__epochs" not in estimator.get_params(deep=False)
    # the deep parameters round-trip, and clone copies them into an unfitted estimator
    assert SCANClustering().set_params(**params).get_params() == params
    copy = clone(estimator)
    assert copy.get_params() == params and copy.overrides is not estimator.overrides
    # nested, '__' and '.' spellings are the same override
    for spelling in ({"cluster": {"epochs": 5}}, {"cluster__epochs": 5}, {"cluster.epochs": 5}):
        assert SCANClustering(overrides=spelling).get_params()["cluster__epochs"] == 5
    # through a Pipeline, as a grid search sets them
    pipe = Pipeline([("scan", SCANClustering())]).set_params(scan__cluster__epochs=7)
    assert pipe.get_params()["scan__cluster__epochs"] == 7
    with pytest.raises(ConfigError, match="did you mean 'cluster__epochs'"):
        estimator.set_params(cluster__epoch=1, seed=9)
    with pytest.raises(ConfigError, match="cluster__epochs is a value"):
        estimator.set_params(cluster__epochs__x=1)
    with pytest.raises(ValueError, match="Invalid parameter"):
        estimator.set_params(n_cluster=3)
    assert estimator.overrides["cluster"] == {"epochs": 5} and estimator.seed == 3   # refused calls changed nothing


def test_overrides_of_what_parameters_or_x_set_are_refused(digits):
    for overrides, message in [({"seed": 1}, "use seed="), ({"data": {"num_clusters": 3}}, "use n_clusters="),
                               ({"quiet": False}, "use quiet="), ({"data.path": "x"}, "images given to fit"),
                               ({"data__dataset": "cifar10"}, "given images, not a path"),
                               ("cluster.epochs=5", "overrides must be a dict")]:
        with pytest.raises(ConfigError, match=message):
            SCANClustering(overrides=overrides).fit(digits)


def test_config_then_pretrained_then_overrides_then_parameters(digits):
    from scan.data import ImageDataset
    images = ImageDataset(torch.zeros((30, 1, 8, 8), dtype=torch.uint8), None, None)
    fit_data = {"data": {"dataset": "npz", "path": "/nowhere/images.npz"}}
    estimator = SCANClustering(n_clusters=None, config="digits", pretrained="efficientnet_lite0", seed=3,
                               device="cpu", overrides={"cluster": {"epochs": 4}, "selflabel__enabled": False})
    cfg = estimator._resolve_config(fit_data, (images, images))
    assert (cfg.data.num_clusters, cfg.seed, cfg.device, cfg.quiet) == (None, 3, "cpu", True)
    assert (cfg.cluster.epochs, cfg.selflabel.enabled, cfg.data.path) == (4, False, "/nowhere/images.npz")
    # config/builtin/pretrained.yaml over the digits config, under the overrides
    assert (cfg.pretext.method, cfg.model.backbone, cfg.cluster.lr) == ("pretrained", "efficientnet_lite0", 1e-3)
    assert estimator.n_clusters is None and estimator.overrides == {"cluster": {"epochs": 4},
                                                                      "selflabel__enabled": False}
    as_object = clone(estimator).set_params(config=cfg, pretrained=None, n_clusters=4, cluster__epochs=6)
    cfg = as_object._resolve_config(fit_data, (images, images))
    assert (cfg.data.num_clusters, cfg.cluster.epochs, cfg.selflabel.enabled) == (4, 6, False)


# ------------------------------------------------------------------ fitting

def test_fit_keeps_parameters_and_adds_only_learned_attributes(fit_record, digits):
    estimator = fit_record["estimator"]
    assert fit_record["returned"] is estimator
    assert joblib.hash(estimator.get_params()) == fit_record["params_hash"]
    assert estimator.overrides is fit_record["overrides"]
    added = set(vars(estimator)) - fit_record["attributes"]
    assert all(a.endswith("_") or a.startswith("_") for a in added), added
    assert {"labels_", "probs_", "features_", "neighbors_", "n_clusters_", "n_features_in_", "filenames_",
            "config_", "run_dir_"} <= added
    check_is_fitted(estimator)
    with pytest.raises(NotFittedError):
        check_is_fitted(clone(estimator))
    assert estimator.n_features_in_ == 64 and estimator.n_clusters_ == NUM_CLUSTERS
    assert estimator.n_clusters_curve_ is None   # C was given
    assert estimator.filenames_ is None   # an array has no files
    cfg = estimator.config_
    assert (cfg.cluster.epochs, cfg.model.width, cfg.data.num_clusters, cfg.seed, cfg.quiet) == (
        2, 8, NUM_CLUSTERS, 0, True)


def test_fit_then_predict_equals_fit_predict_and_learned_attributes(fitted, digits):
    again = clone(fitted)
    labels = again.fit_predict(digits, np.zeros(len(digits)))
    assert np.array_equal(fitted.predict(digits), labels)      # same seed, separate fits
    assert np.array_equal(fitted.labels_, labels)
    assert labels.dtype.kind == "i" and labels.shape == (len(digits),)
    assert labels.min() >= 0 and labels.max() < NUM_CLUSTERS
    first_dir = again.run_dir_
    assert np.array_equal(again.fit(digits).labels_, labels)   # refitting gives the same model (idempotent)
    assert again.run_dir_ != first_dir and not first_dir.exists()   # the earlier temporary run is gone
    n = len(digits)
    assert fitted.probs_.shape == (n, NUM_CLUSTERS)
    assert fitted.neighbors_.shape == (n, 5)
    assert fitted.features_.shape[0] == n
    assert fitted.cluster_names_ == {} and fitted.metrics_["num_clusters"] == NUM_CLUSTERS


def test_fit_on_a_folder_lists_its_files_in_label_order(digits, tmp_path):
    folder = tmp_path / "pile"
    for group in ("a", "b"):
        (folder / group).mkdir(parents=True)
    for i, image in enumerate(digits[:40]):
        Image.fromarray(image).save(folder / ("a" if i % 2 else "b") / f"{i:02d}.png")
    estimator = tiny(overrides={**tiny_overrides(), "data__image_size": 8}).fit(str(folder))
    assert sorted(estimator.filenames_) == sorted(str(p) for p in folder.rglob("*.png"))
    assert estimator.n_features_in_ == 3 * 8 * 8   # folders are read as RGB
    # each file, predicted on its own, gets the label at its position in labels_
    assert np.array_equal(estimator.predict(estimator.filenames_), estimator.labels_)


def test_pretrained_means_what_the_command_line_option_means(digits, tmp_path):
    from scan.cli import _add_run_options
    from scan.nets.models import build_backbone
    from scan.pipeline.resolve import build_config
    backbone = build_backbone("resnet_small", 1, [0.3], [0.2], width=8)
    torch.save(backbone.state_dict(), tmp_path / "w.pt")
    np.savez(tmp_path / "pile.npz", images=digits[:120])
    estimator = tiny(pretrained=str(tmp_path / "w.pt")).fit(str(tmp_path / "pile.npz"))
    assert estimator.filenames_ is None and estimator.labels_.shape == (120,)

    parser = argparse.ArgumentParser()
    _add_run_options(parser)
    args = ["--data", str(tmp_path / "pile.npz"), "--pretrained", str(tmp_path / "w.pt"),
            "--num-clusters", str(NUM_CLUSTERS), "--quiet"]
    for key, value in tiny_overrides().items():
        args += ["--set", f"{key.replace('__', '.')}={value}"]
    cli_config, _ = build_config(parser.parse_args(args))
    assert cli_config.pretext.method == "pretrained"
    assert estimator.config_.to_dict() == cli_config.to_dict()
    with pytest.raises(ConfigError, match="neither a pretrained network"):
        tiny(pretrained=str(tmp_path / "missing.pt")).fit(digits)


# ------------------------------------------------------------------ predicting

def test_predict_proba_rows_sum_to_one_for_arrays_tensors_and_floats(fitted, digits):
    probs = fitted.predict_proba(digits[:50])
    assert probs.shape == (50, NUM_CLUSTERS)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    as_tensor = fitted.predict_proba(torch.from_numpy(digits[:50].copy()).unsqueeze(1))   # torch: (N, C, H, W)
    as_float = fitted.predict_proba(digits[:50, :, :, None] / 255.0)                       # numpy: (N, H, W, C)
    as_fortran = fitted.predict_proba(np.asfortranarray(digits[:50]))
    np.testing.assert_allclose(as_tensor, probs, atol=1e-6)
    np.testing.assert_allclose(as_float, probs, atol=1e-6)
    np.testing.assert_allclose(as_fortran, probs, atol=1e-6)


def test_predict_does_not_depend_on_order_batch_or_state(fitted, digits):
    state = joblib.hash({k: v for k, v in vars(fitted).items() if not k.startswith("_")})
    labels = fitted.predict(digits)
    order = np.random.default_rng(0).permutation(len(digits))
    assert np.array_equal(fitted.predict(digits[order]), labels[order])
    assert np.array_equal(np.concatenate([fitted.predict(digits[i:i + 7]) for i in range(0, len(digits), 7)]),
                          labels)
    assert joblib.hash({k: v for k, v in vars(fitted).items() if not k.startswith("_")}) == state


def test_predict_on_an_unseen_image_file(fitted, tmp_path):
    path = tmp_path / "unseen.png"
    rgb = np.repeat(np.uint8(load_digits().images[-1] * 255 / 16)[..., None], 3, axis=2)
    Image.fromarray(rgb).resize((32, 32)).save(path)   # larger and RGB: resized and turned grey as in training
    pred = fitted.predict(str(path))
    assert pred.shape == (1,) and 0 <= pred[0] < NUM_CLUSTERS


def test_pickled_estimator_predicts_the_same(fitted, digits):
    copy = pickle.loads(pickle.dumps(fitted))
    assert np.array_equal(copy.predict(digits[:50]), fitted.predict(digits[:50]))
    assert copy.get_params() == fitted.get_params()


# ------------------------------------------------------------------ persistence and errors

def test_save_and_load_give_the_same_predictions(fitted, digits, tmp_path):
    path = fitted.save(tmp_path / "model")
    assert not list(path.rglob("checkpoint.pt"))
    loaded = SCANClustering.load(path)
    assert loaded.n_clusters == loaded.n_clusters_ == NUM_CLUSTERS and loaded.run_dir == path
    assert loaded.config.cluster.epochs == 2 and loaded.seed == 0   # parameters describing the saved run
    assert np.array_equal(loaded.labels_, fitted.labels_)
    assert np.array_equal(loaded.predict(digits[:40]), fitted.predict(digits[:40]))
    # the copy reads its own copy of the training array, so its report works once the original is gone
    assert yaml.safe_load((path / "config.yaml").read_text())["data"]["path"] == str((path / "images.npz").resolve())
    assert "section class=\"cluster" in write_report(path).read_text()
    with pytest.raises(RunError, match="not empty: pass overwrite=True"):
        fitted.save(path)
    assert fitted.save(path, overwrite=True) == path
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(RunError, match="something other than a saved model"):
        fitted.save(tmp_path / "other", overwrite=True)
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"
    # a live `scan run` holds the saved run's lock: overwriting is refused, and nothing there changes
    import subprocess
    import sys
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from scan.rundir.directory import lock_run_dir; lock_run_dir(Path(sys.argv[1])); "
                               "print('locked', flush=True); time.sleep(60)", str(path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = sorted(p.relative_to(path) for p in path.rglob("*"))
        with pytest.raises(ConfigError, match="in use by another scan"):
            fitted.save(path, overwrite=True)
        assert sorted(p.relative_to(path) for p in path.rglob("*")) == before
    finally:
        holder.kill()
        holder.wait()


def test_a_given_run_dir_holds_the_run_and_stays(digits, tmp_path):
    estimator = tiny(run_dir=tmp_path / "run").fit(digits[:100])
    assert estimator.run_dir_ == tmp_path / "run" and estimator.run_dir == tmp_path / "run"
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "images.npz").is_file()
    assert np.array_equal(SCANClustering.load(tmp_path / "run").labels_, estimator.labels_)


def test_user_errors_are_one_line(fitted, tmp_path):
    with pytest.raises(NotFittedError, match="not fitted"):
        SCANClustering().predict(np.zeros((2, 8, 8), np.uint8))
    checks = [
        (lambda: tiny(n_clusters=3).fit(str(tmp_path / "missing")), DataError, "missing does not exist"),
        (lambda: tiny().fit(np.full((20, 8, 8), np.nan)), RunError, "NaN or infinite"),
        (lambda: tiny().fit(np.zeros((0, 8, 8), np.uint8)), RunError, "fit.X. needs images"),
        (lambda: tiny().fit(np.zeros((20, 8), np.float32)), RunError, "must have shape"),
        (lambda: fitted.predict(np.zeros((2, 9, 9), np.uint8)), RunError, "the model expects 8x8"),
        (lambda: fitted.predict(np.zeros((2, 8, 8), np.int32)), RunError, "must be uint8"),
        (lambda: fitted.predict(np.zeros((2, 8, 8), np.complex64)), RunError, "must be uint8"),
        (lambda: fitted.predict(np.zeros((8, 8), np.uint8)), RunError, "must have shape"),
        (lambda: fitted.predict(np.zeros(8, np.uint8)), RunError, "must have shape"),
        (lambda: fitted.predict(np.full((2, 8, 8), np.nan)), RunError, "NaN or infinite"),
        (lambda: fitted.predict(str(tmp_path / "nope.png")), DataError, "nope.png does not exist"),
        (lambda: SCANClustering.load(tmp_path), RunError, "not a scan run directory"),
    ]
    for call, error, message in checks:
        with pytest.raises(error, match=message) as info:
            call()
        assert len(str(info.value).splitlines()) == 1


def test_n_clusters_auto_chooses_and_exposes_the_curve(tmp_path):
    """n_clusters="auto": the choose stage picks C (three unmistakable kinds of image), n_clusters_ is the
    choice and n_clusters_curve_ the score of every candidate (choose.max_clusters=6 via overrides)."""
    rng = np.random.default_rng(0)
    bases = np.stack([np.full((10, 10), 20), np.full((10, 10), 235), np.tile([0, 255] * 5, (10, 1))])
    kinds = np.repeat(np.arange(3), 30)
    images = np.clip(bases[kinds] + rng.integers(-15, 16, (90, 10, 10)), 0, 255).astype(np.uint8)
    estimator = tiny(n_clusters="auto", overrides={**tiny_overrides(), "choose__max_clusters": 6})
    labels = estimator.fit_predict(images)
    assert estimator.n_clusters_ == 3 and sorted(estimator.n_clusters_curve_) == [2, 3, 4, 5, 6]
    assert estimator.n_clusters_curve_[3] == max(estimator.n_clusters_curve_.values())
    assert labels.shape == (90,) and estimator.probs_.shape == (90, 3)
    assert clone(estimator).n_clusters == "auto"
