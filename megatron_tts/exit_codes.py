"""The exit-code contract between training, torchrun agents, supervisors and slurm/pretrain.sh.

0   DONE     training reached train.steps; do not requeue.
1   CRASH    an unexpected failure (a bug, a lost peer); a supervisor may retry a bounded
             number of times (torchrun --max-restarts does).
3   FATAL    retrying cannot help (bad config, bad data paths, exhausted rollback budget):
             never requeue.
75  REQUEUE  stopped on purpose with a committed checkpoint (SIGTERM/SIGINT/SIGUSR1, a hang
             detected by the watchdog): requeue and resume. 75 is sysexits' EX_TEMPFAIL.
"""

EXIT_DONE = 0
EXIT_CRASH = 1
EXIT_FATAL = 3
EXIT_REQUEUE = 75
