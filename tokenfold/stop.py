"""How a training run stops early: the stop signals and the exit statuses (the contract with the SLURM
scripts, slurm/05_train_lm.sbatch)::

    0    finished (final/ written), or was already finished
    124  EXIT_REQUEUE: stopped early because SIGTERM or SIGUSR1 arrived (SLURM sends them before a
         time limit or preemption; ask for one in time with ``#SBATCH --signal=USR1@300``), or
         because --stop-after-steps was reached, AFTER writing a checkpoint. Requeue the job /
         rerun the same command and it resumes exactly.
    1    error (one line on stderr)

`StopFlag` only records that a signal arrived; the training loop checks it at step boundaries. Under
DDP every rank catches the signal; the ranks agree at each step boundary (an all-reduce of the stop
flag), so it is enough that one rank receives it.
"""
from __future__ import annotations

import logging
import signal

log = logging.getLogger("tokenfold.stop")

EXIT_OK = 0
EXIT_REQUEUE = 124
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    """Set by SIGTERM / SIGUSR1; the loop checks it at step boundaries."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def install(self):
        for s in STOP_SIGNALS:
            try:
                self._old[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread (e.g. inside some test runners): no handler
                pass
        return self

    def _handler(self, signum, frame):
        self.signum = signum
        log.warning("received %s: will save a checkpoint and exit with status %d at the end of this step",
                    signal.Signals(signum).name, EXIT_REQUEUE)

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}
