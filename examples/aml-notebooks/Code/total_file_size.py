"""Entry script of the partition-per-folder notebook: one partition (a user
and a genre) per mini-batch; for each file, its size, its share of the
partition's size, and the partition's total.

``run`` takes Azure ML's second argument, ``mini_batch_context``: the
partition's key values and its data set (the input filtered to it).
"""

import os


def init():
    print("Init")


def run(mini_batch, mini_batch_context):
    keys = mini_batch_context.partition_key_value
    print(f"run method start: {__file__}, partition {keys}")
    # the data set of this partition: its files, as the input names them
    print(f"dataset = {mini_batch_context.dataset}")
    print(f"files of the partition: {mini_batch_context.dataset.to_path()}")

    sizes = [os.path.getsize(path) for path in mini_batch]
    total = sum(sizes)
    rows = []
    for path, size in zip(mini_batch, sizes, strict=True):
        fields = [os.path.basename(path), size, size / total]
        fields += [keys["user"], keys["genres"], total]
        rows.append(",".join(str(field) for field in fields))
    return rows
