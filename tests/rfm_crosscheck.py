"""Cross-check of RFM scores and BG/NBD's frequency, recency and T, computed here with pandas,
numpy and the `lifetimes` package rather than by the agent.

The population is the hand-computed KPI customer of src/profiles/kpi.rs ("hand": four sales
and a return over 2025-2026) plus 80 customers drawn from a seeded generator: purchases on
random days over three years, some days with two baskets, some returns. Writes
tests/fixtures/rfm_crosscheck.json; `cargo test --test it rfm_crosscheck::` feeds the same
transactions through the agent's profile store and compares every figure.

Definitions (the agent's module doc says the same):
- frequency, recency, T: lifetimes' summary_data_from_transaction_data over sale days, in days
  (repeat purchase days; first to last purchase; first purchase to the observation day).
- RFM inputs: days since the last sale; distinct sale days; net revenue (sales minus returns).
- Breakpoints: numpy.quantile at 0.2, 0.4, 0.6 and 0.8 (linear). Scores: F and M are
  1 + the number of breakpoints below the value; R is 5 - the number of breakpoints below the
  days since the last sale.

    pip install lifetimes && python3 tests/rfm_crosscheck.py
"""
import datetime as dt
import json
import pathlib

import numpy as np
import pandas as pd
from lifetimes.utils import summary_data_from_transaction_data

AS_OF = dt.date(2026, 11, 22)
rng = np.random.default_rng(7)

rows = [
    ("hand", "2025-01-10", 4000),
    ("hand", "2025-03-01", 6000),
    ("hand", "2025-06-19", 2000),
    ("hand", "2025-06-25", -1000),
    ("hand", "2026-02-04", 9000),
]
for c in range(80):
    cid = f"c{c:03d}"
    first = dt.date(2023, 12, 1) + dt.timedelta(days=int(rng.integers(0, 1000)))
    n = int(rng.integers(1, 14))
    days = sorted(
        first + dt.timedelta(days=int(d)) for d in rng.integers(0, max(1, (AS_OF - first).days), n)
    )
    days[0] = first
    for d in days:
        amount = int(rng.integers(5, 200)) * 100 + int(rng.integers(0, 100))
        rows.append((cid, d.isoformat(), amount))
        if rng.random() < 0.1:  # a second basket the same day
            rows.append((cid, d.isoformat(), int(rng.integers(1, 50)) * 100))
        if rng.random() < 0.08:  # a return a few days later
            ret = min(d + dt.timedelta(days=int(rng.integers(1, 20))), AS_OF)
            rows.append((cid, ret.isoformat(), -int(rng.integers(1, 40)) * 100))

tx = pd.DataFrame(rows, columns=["customer", "day", "amount"])
tx["day"] = pd.to_datetime(tx["day"])
sales = tx[tx["amount"] > 0]
summary = summary_data_from_transaction_data(
    sales, "customer", "day", observation_period_end=pd.Timestamp(AS_OF), freq="D"
)

per = pd.DataFrame(
    {
        "days_since_last": (pd.Timestamp(AS_OF) - sales.groupby("customer")["day"].max()).dt.days,
        "purchase_days": sales.groupby("customer")["day"].nunique(),
        "net_revenue": tx.groupby("customer")["amount"].sum(),
    }
).dropna()
qs = [0.2, 0.4, 0.6, 0.8]
bp = {
    "recency_days": np.quantile(per["days_since_last"].astype(float), qs).tolist(),
    "frequency": np.quantile(per["purchase_days"].astype(float), qs).tolist(),
    "monetary": np.quantile(per["net_revenue"].astype(float), qs).tolist(),
}


def beyond(q, v):
    return int(sum(1 for b in q if b < v))


customers = {}
for cid, row in per.iterrows():
    s = summary.loc[cid]
    customers[cid] = {
        "frequency": int(s["frequency"]),
        "recency": int(s["recency"]),
        "T": int(s["T"]),
        "rfm": [
            5 - beyond(bp["recency_days"], row["days_since_last"]),
            1 + beyond(bp["frequency"], row["purchase_days"]),
            1 + beyond(bp["monetary"], row["net_revenue"]),
        ],
    }

out = {
    "as_of": AS_OF.isoformat(),
    "transactions": [{"customer": c, "day": d, "amount": a} for c, d, a in rows],
    "breakpoints": bp,
    "customers": customers,
}
path = pathlib.Path(__file__).parent / "fixtures" / "rfm_crosscheck.json"
path.write_text(json.dumps(out, indent=1) + "\n")
print(f"wrote {path}: {len(rows)} transactions, {len(customers)} customers")
