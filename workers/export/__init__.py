"""Export a trained run (``python -m workers.export``) and run the export (``python -m workers.export.predict``)."""
