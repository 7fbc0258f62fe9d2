"""Prefect flows: thin tables of contents over ``butter_pipeline`` calls (installed as butter_pipeline.flows)."""
