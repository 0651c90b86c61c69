"""Prefect flows that orchestrate the DVC pipeline: DVC decides what reruns, Prefect decides when."""
