"""SCAN: unsupervised image classification by semantic clustering of adopted nearest neighbours."""
__version__ = "0.1.0"
