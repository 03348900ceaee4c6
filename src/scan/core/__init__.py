"""The bottom layer: errors, the registry helper, hashing, atomic files and safe loading, and the
process group of a torchrun job. Imports nothing else of scan."""
