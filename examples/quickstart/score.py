"""Quick-start entry script: score short text reviews by sentiment.

A stand-in for a real model: init() "loads" a word lexicon once per worker
process, run() scores a whole mini-batch of files and returns one
"<file name>: <score> <label>" line per file.
"""

import argparse
import os

POSITIVE = {"good", "great", "excellent", "love", "fast", "friendly", "perfect"}
NEGATIVE = {"bad", "slow", "broken", "poor", "rude", "late", "awful"}


def init():
    global lexicon, threshold
    parser = argparse.ArgumentParser()
    parser.add_argument("--threshold", type=int, default=0)
    args, _ = parser.parse_known_args()
    threshold = args.threshold
    lexicon = {**{w: 1 for w in POSITIVE}, **{w: -1 for w in NEGATIVE}}


def run(mini_batch):
    results = []
    for path in mini_batch:
        with open(path) as f:
            words = f.read().lower().replace(".", " ").replace(",", " ").split()
        score = sum(lexicon.get(w, 0) for w in words)
        label = "positive" if score > threshold else "negative"
        results.append(f"{os.path.basename(path)}: {score} {label}")
    return results
