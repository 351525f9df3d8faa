"""Entry script of the partition-per-column notebook: one partition (a
store and a brand) per mini-batch; each row gets the partition's total
income."""


def init():
    print("Init")


def run(mini_batch):
    print(f"run method start: {__file__}, {len(mini_batch)} rows")
    total_income = mini_batch["INCOME"].sum()
    print(f"total_income = {total_income}")
    mini_batch["total_income"] = total_income
    return mini_batch
