"""Known answers for BG/NBD, from an implementation that is not ours.

Takes the CDNOW summary the `lifetimes` package ships (2,357 customers, weeks), the
parameters of its published fit (r = 0.24, alpha = 4.41, a = 0.79, b = 2.43), and writes
P(alive) and the conditional expected purchases in the next 39 weeks for a sample of
customers to tests/fixtures/bgnbd_cdnow.json. `cargo test --test it kpi_known_answers::` checks
the agent's formulas against it to 1e-6.

    pip install lifetimes && python3 tests/bgnbd_cdnow.py
"""
import json
import pathlib

import numpy as np
import pandas as pd
from lifetimes import BetaGeoFitter
from lifetimes.datasets import load_cdnow_summary

data = load_cdnow_summary(index_col=[0])
model = BetaGeoFitter()
model.params_ = pd.Series({"r": 0.24, "alpha": 4.41, "a": 0.79, "b": 2.43})

# Every 60th customer, plus the first ten: one-timers, heavy buyers, lapsed ones.
sample = pd.concat([data.iloc[:10], data.iloc[10::60]])
t = 39.0
rows = []
for cid, row in sample.iterrows():
    x, t_x, T = float(row["frequency"]), float(row["recency"]), float(row["T"])
    rows.append(
        {
            "customer": int(cid),
            "x": x,
            "t_x": t_x,
            "T": T,
            "p_alive": float(np.asarray(model.conditional_probability_alive(x, t_x, T)).item()),
            "t": t,
            "expected": float(np.asarray(model.conditional_expected_number_of_purchases_up_to_time(t, x, t_x, T)).item()),
        }
    )
out = pathlib.Path(__file__).parent / "fixtures" / "bgnbd_cdnow.json"
out.write_text(json.dumps({"params": {"r": 0.24, "alpha": 4.41, "a": 0.79, "b": 2.43}, "customers": rows}, indent=1) + "\n")
print(f"{len(rows)} customers written to {out}")
