"""The built-in stages, one module each; importing this package registers them in pipeline order."""
from scan.stages import pretext, mine, cluster, selflabel, refine, evaluate  # noqa: F401
