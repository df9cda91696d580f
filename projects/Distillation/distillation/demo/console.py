"""What the demo shows while it runs: stage lines and per-run progress on the console, each
run's full log (detectron2's, this project's, the evaluation tables) in its own log.txt."""
import logging
import os
import sys
import time

# run_demo.py --verbose: detectron2's full log on the console too. Read at call time (a module
# attribute, not a default argument), so the CLI and a worker process can set it.
VERBOSE = False

_console = None  # the terminal while a run's stdout goes to its log.txt


def say(text: str) -> None:
    """One line on the console, also while a run's stdout goes to its log."""
    print(text, file=_console or sys.stdout, flush=True)


def say_stage(stage: int, total: int, text: str) -> None:
    say(f"[demo] stage {stage}/{total}: {text}")


class RunLog:
    """For one run: detectron2's and this project's log, and what evaluation prints, go to
    OUTPUT_DIR/log.txt; the console shows only warnings (everything with VERBOSE)."""

    NAMES = ("detectron2", "fvcore", "distillation")

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, "log.txt")

    def __enter__(self):
        global _console
        self.stream = open(self.path, "a")
        self.stdout = sys.stdout
        if not VERBOSE:  # pycocotools prints its evaluation tables
            _console, sys.stdout = sys.stdout, self.stream
        self.file = logging.FileHandler(self.path)
        self.file.setFormatter(logging.Formatter("[%(asctime)s %(name)s %(levelname)s] "
                                                 "%(message)s"))
        self.saved = []
        for name in self.NAMES:
            log = logging.getLogger(name)
            log.addHandler(self.file)
            self.saved.append((log, log.level, [(h, h.level) for h in log.handlers
                                                if h is not self.file]))
            log.setLevel(logging.DEBUG if log.level == logging.NOTSET else
                         min(log.level, logging.INFO))
            if not VERBOSE:
                for h, _ in self.saved[-1][2]:
                    h.setLevel(max(h.level, logging.WARNING))
        return self

    def __exit__(self, *exc):
        global _console
        sys.stdout, _console = self.stdout, None
        self.stream.close()
        for log, level, handlers in self.saved:
            log.removeHandler(self.file)
            log.setLevel(level)
            for h, h_level in handlers:
                h.setLevel(h_level)
        self.file.close()


def progress_hook(max_iter: int, label: str = ""):
    """One console line about every 10 % of a run: iteration, total loss, ETA."""
    from detectron2.engine import HookBase

    class Progress(HookBase):
        def before_train(self):
            self.start = time.time()

        def after_step(self):
            done = self.trainer.iter + 1
            if done % max(1, max_iter // 10) and done != max_iter:
                return
            losses = self.trainer.storage.latest()
            loss = sum(v[0] for k, v in losses.items() if k.startswith("loss"))
            eta = (time.time() - self.start) / done * (max_iter - done)
            say(f"[demo]   {label + ': ' if label else ''}iter {done}/{max_iter}  "
                f"loss {loss:.3f}  ETA {eta / 60:.1f} min")

    return Progress()
