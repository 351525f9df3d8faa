"""Entry scripts (init() and run(mini_batch)) shared by the tests.

Each is the text of a ``score.py`` to write with
:func:`tests.helpers.write_script`; a function makes the variants that
differ in a value (how long run() takes, which file it holds, where its
markers go). A script only one test uses stays in that test's module.
"""

from __future__ import annotations

from pathlib import Path


def names_script(seconds: float = 0) -> str:
    """run() that takes ``seconds`` per mini-batch and returns the file
    names."""
    return f"""
import os, time

def init():
    pass

def run(mini_batch):
    time.sleep({seconds!r})
    return [os.path.basename(p) for p in mini_batch]
"""


# run() that returns the file names
NAMES = names_script()

# run() that takes 0.2 s per mini-batch and returns the file names
SLOW_SCRIPT = names_script(0.2)

# run() that returns its mini-batch (file paths, or a data frame) as it came
ECHO = """
def init():
    pass

def run(mini_batch):
    return mini_batch
"""

# each item: the pid of the worker process that ran it
PIDS = """
import os

def init():
    pass

def run(mini_batch):
    return [str(os.getpid()) for _ in mini_batch]
"""

# run() that raises for a file named ...-poison, else returns the names
POISON_SCRIPT = """
import os

def init():
    pass

def run(mini_batch):
    for p in mini_batch:
        if "poison" in os.path.basename(p):
            raise ValueError(f"cannot score {os.path.basename(p)}")
    return [os.path.basename(p) for p in mini_batch]
"""

# run() that raises for rows with a negative v, else returns them
ROWS_SCRIPT = """
def init():
    pass

def run(df):
    if (df["v"] < 0).any():
        raise ValueError(f"negative v in rows {list(df.index[df['v'] < 0])}")
    return df
"""


def fixable_script(*, mark_each_item: bool, seconds: float = 0) -> str:
    """run() that fails on a file named ``bad...`` or ``...poison...`` until
    the file given as ``--fixed`` exists, and returns the names. Each call
    leaves a marker ``<name>.<random>`` in the folder given as ``--calls``:
    one for each of its files (``mark_each_item``) or for its first; then
    it takes ``seconds``."""
    return f"""
import argparse, os, time, uuid

MARK_EACH_ITEM = {mark_each_item!r}
SECONDS = {seconds!r}

def init():
    global calls, fixed
    p = argparse.ArgumentParser()
    p.add_argument("--calls")
    p.add_argument("--fixed")
    args, _ = p.parse_known_args()
    calls, fixed = args.calls, args.fixed

def run(mini_batch):
    names = [os.path.basename(p) for p in mini_batch]
    for name in names if MARK_EACH_ITEM else names[:1]:
        open(os.path.join(calls, f"{{name}}.{{uuid.uuid4().hex}}"), "w").close()
    time.sleep(SECONDS)
    for name in names:
        if ("poison" in name or name.startswith("bad")) and not os.path.exists(fixed):
            raise ValueError(f"not fixed yet: {{name}}")
    return names
"""


def gated_script(go: Path | str, gated: str = "f00039.txt") -> str:
    """run() that holds the mini-batch of file ``gated`` until ``go``
    exists, and returns the names."""
    return f"""
import os, time

def init():
    pass

def run(mini_batch):
    names = [os.path.basename(p) for p in mini_batch]
    while {gated!r} in names and not os.path.exists({str(go)!r}):
        time.sleep(0.05)
    return names
"""


# The tutorial's digit_identification.py, with a "model" that is a text file:
# the prediction is the image's content plus the model's offset.
DIGIT_SCRIPT = """
import os
from daskrun import Model

def init():
    global offset
    model_path = Model.get_model_path("mnist")
    offset = int(open(os.path.join(model_path, "weights.txt")).read())
    marker = os.environ.get("INIT_MARKERS")
    if marker:
        open(os.path.join(marker, f"{os.getpid()}-{time_ns()}"), "w").close()

def time_ns():
    import time
    return time.time_ns()

def run(mini_batch):
    result_list = []
    for image in mini_batch:
        best_result = int(open(image).read()) + offset
        result_list.append("{}: {}".format(os.path.basename(image), best_result))
    return result_list
"""

# run() whose "victims" (mini-batches named by their first file) wait in
# run() on each of their first ``VICTIMS[name]`` starts, having written their
# worker's pid to MARKS/<name>.<start>.pid, until the test kills the process
# (see helpers.VictimKiller), or until MARKS/release exists. A victim that
# finishes appends its pid to MARKS/<name>.done. Every mini-batch then takes
# ``seconds`` per file and returns the file names.
VICTIM_SCRIPT = """
import os, time

MARKS = {marks!r}
VICTIMS = {victims!r}

def init():
    pass

def run(mini_batch):
    name = os.path.basename(mini_batch[0])
    pid = str(os.getpid())
    if name in VICTIMS:
        marks = [f for f in os.listdir(MARKS) if f.startswith(name + ".")]
        started = len([f for f in marks if f.endswith(".pid")])
        if started < VICTIMS[name]:
            mark = os.path.join(MARKS, name + "." + str(started) + ".pid")
            with open(mark + ".tmp", "w") as f:
                f.write(pid)
            os.replace(mark + ".tmp", mark)
            deadline = time.monotonic() + 120
            release = os.path.join(MARKS, "release")
            while not os.path.exists(release) and time.monotonic() < deadline:
                time.sleep(0.02)
    time.sleep({seconds} * len(mini_batch))
    if name in VICTIMS:
        with open(os.path.join(MARKS, name + ".done"), "a") as f:
            f.write(pid + "\\n")
    return [os.path.basename(p) for p in mini_batch]
"""
