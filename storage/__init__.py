"""The bottom layer: files and URLs (local paths, fsspec/S3) and durable writes.

Both the data pipeline and checkpoints import from here; nothing here imports the project.
"""
