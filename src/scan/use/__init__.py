"""Using a trained run: assign new images (inference), export it, the CSV files, and the
scikit-learn estimator."""
