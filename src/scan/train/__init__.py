"""Training machinery shared by the stages: the runtime and the one epoch loop (engine), training
logs, the feature cache and feature sources, neighbour miners and SPC refinement."""
