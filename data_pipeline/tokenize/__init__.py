"""Audio corpora -> codec-token shards: readers, work units and resume, the worker, the CLI."""
