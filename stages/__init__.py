"""The pipeline's stages, one module each, runnable as `python -m stages.<name>`; dvc.yaml wires them."""

import logging

# Importing bitsandbytes on a CPU looks for an optional kernel package from the Hugging Face hub and logs a
# warning when it is absent; the stages run without it, so the warning is only noise in every stage's log.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
