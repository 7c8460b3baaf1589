"""The exit-code contract between training, torchrun agents, supervisors and slurm/pretrain.sh.

0   DONE     training reached train.steps; do not requeue.
1   CRASH    an unexpected failure (a bug, a lost peer); a supervisor may retry.
3   FATAL    retrying cannot help (bad config, bad data paths, exhausted rollback budget):
             never requeue.
"""

EXIT_DONE = 0
EXIT_CRASH = 1
EXIT_FATAL = 3
