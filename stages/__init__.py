"""The pipeline's stages, one module each, runnable as `python -m stages.<name>`; dvc.yaml wires them."""
