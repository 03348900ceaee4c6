"""SCAN: unsupervised image classification by semantic clustering of adopted nearest neighbours."""
__version__ = "0.1.0"


def __getattr__(name: str):
    # `from scan import SCANClustering` without importing torch for `import scan` alone
    if name == "SCANClustering":
        from scan.use.estimator import SCANClustering
        return SCANClustering
    raise AttributeError(f"module 'scan' has no attribute {name!r}")
