"""The scikit-learn style estimator: fit/predict contracts, inputs, persistence, errors."""
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.exceptions import NotFittedError

from scan import SCANClustering
from scan.data import DataError
from scan.inference import RunError
from scan.report import write_report

NUM_CLUSTERS = 5


@pytest.fixture(scope="module")
def digits():
    """300 digits as (N, 8, 8) uint8, the way a user would pass an image array."""
    return np.uint8(load_digits().images[:300] * 255 / 16)


def tiny_params() -> dict:
    """conftest's tiny overrides in the estimator's scikit-learn spelling (cluster__epochs=2)."""
    from conftest import TINY
    params = {}
    for text in TINY:
        key, value = text.split("=", 1)
        params[key.replace(".", "__")] = yaml.safe_load(value)
    return params


@pytest.fixture(scope="module")
def fitted(digits):
    return SCANClustering(n_clusters=NUM_CLUSTERS, **tiny_params()).fit(digits)


def test_fit_then_predict_equals_fit_predict_and_learned_attributes(fitted, digits):
    labels = SCANClustering(n_clusters=NUM_CLUSTERS, **tiny_params()).fit_predict(digits)
    assert np.array_equal(fitted.predict(digits), labels)      # same seed, separate fits
    assert np.array_equal(fitted.labels_, labels)
    n = len(digits)
    assert fitted.probs_.shape == (n, NUM_CLUSTERS)
    assert fitted.neighbors_.shape == (n, 5)
    assert fitted.features_.shape[0] == n
    assert fitted.cluster_names_ == {} and fitted.metrics_["num_clusters"] == NUM_CLUSTERS


def test_predict_proba_rows_sum_to_one_for_arrays_tensors_and_floats(fitted, digits):
    probs = fitted.predict_proba(digits[:50])
    assert probs.shape == (50, NUM_CLUSTERS)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    as_tensor = fitted.predict_proba(torch.from_numpy(digits[:50]).unsqueeze(1))   # torch: (N, C, H, W)
    as_float = fitted.predict_proba(digits[:50, :, :, None] / 255.0)                 # numpy: (N, H, W, C)
    np.testing.assert_allclose(as_tensor, probs, atol=1e-6)
    np.testing.assert_allclose(as_float, probs, atol=1e-6)


def test_predict_on_an_unseen_image_file(fitted, tmp_path):
    path = tmp_path / "unseen.png"
    rgb = np.repeat(np.uint8(load_digits().images[-1] * 255 / 16)[..., None], 3, axis=2)
    Image.fromarray(rgb).resize((32, 32)).save(path)   # larger and RGB: resized and turned grey as in training
    pred = fitted.predict(str(path))
    assert pred.shape == (1,) and 0 <= pred[0] < NUM_CLUSTERS


def test_save_and_load_give_the_same_predictions(fitted, digits, tmp_path):
    path = fitted.save(tmp_path / "model")
    assert not list(path.rglob("checkpoint.pt"))
    loaded = SCANClustering.load(path)
    assert loaded.n_clusters == NUM_CLUSTERS
    assert np.array_equal(loaded.labels_, fitted.labels_)
    assert np.array_equal(loaded.predict(digits[:40]), fitted.predict(digits[:40]))
    # the copy reads its own copy of the training array, so its report works once the original is gone
    assert yaml.safe_load((path / "config.yaml").read_text())["data"]["path"] == str((path / "images.npz").resolve())
    assert "section class=\"cluster" in write_report(path).read_text()


def test_user_errors_are_one_line(fitted, tmp_path):
    with pytest.raises(NotFittedError, match="not fitted"):
        SCANClustering().predict(np.zeros((2, 8, 8), np.uint8))
    checks = [
        (lambda: SCANClustering(n_clusters=3, **tiny_params()).fit(str(tmp_path / "missing")), DataError,
         "missing does not exist"),
        (lambda: fitted.predict(np.zeros((2, 9, 9), np.uint8)), RunError, "the model expects 8x8"),
        (lambda: fitted.predict(np.zeros((2, 8, 8), np.int32)), RunError, "must be uint8"),
        (lambda: fitted.predict(np.zeros((8, 8), np.uint8)), RunError, "must have shape"),
        (lambda: fitted.predict(np.full((2, 8, 8), np.nan)), RunError, "NaN or infinite"),
        (lambda: fitted.predict(str(tmp_path / "nope.png")), DataError, "nope.png does not exist"),
        (lambda: SCANClustering.load(tmp_path), RunError, "not a scan run directory"),
    ]
    for call, error, message in checks:
        with pytest.raises(error, match=message) as info:
            call()
        assert len(str(info.value).splitlines()) == 1
