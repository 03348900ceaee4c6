"""The built-in stages, one module each; importing this package registers them in pipeline order."""
# isort: off
# the import order is the pipeline order: each module registers its stage when imported
from scan.pipeline.stages import pretext  # noqa: F401
from scan.pipeline.stages import choose  # noqa: F401
from scan.pipeline.stages import mine  # noqa: F401
from scan.pipeline.stages import cluster  # noqa: F401
from scan.pipeline.stages import selflabel  # noqa: F401
from scan.pipeline.stages import refine  # noqa: F401
from scan.pipeline.stages import evaluate  # noqa: F401
# isort: on
