"""Known answers for Gamma-Gamma and CLV, from an implementation that is not ours.

Fits the Gamma-Gamma model the way `lifetimes`' quickstart does (the 946 returning customers
of the CDNOW summary with monetary values; printed there rounded as p = 6.25, q = 3.74,
v = 15.45), keeps the fitted parameters at full precision, and writes for a sample of
customers the conditional expected average profit and the undiscounted 12-month CLV (BG/NBD
refitted on the same summary, `discount_rate=0`) to tests/fixtures/gammagamma_cdnow.json.
`cargo test --test it kpi_known_answers::` checks the agent's formulas against it to 1e-4,
including the quickstart's published 24.658619 (customer 1) and 71.462843 (customer 6).

    pip install lifetimes && python3 tests/gammagamma_cdnow.py
"""
import json
import pathlib

import pandas as pd
from lifetimes import BetaGeoFitter, GammaGammaFitter
from lifetimes.datasets import load_cdnow_summary_data_with_monetary_value

data = load_cdnow_summary_data_with_monetary_value()
returning = data[data["frequency"] > 0]
ggf = GammaGammaFitter(penalizer_coef=0)
ggf.fit(returning["frequency"], returning["monetary_value"])
bgf = BetaGeoFitter(penalizer_coef=0)
bgf.fit(data["frequency"], data["recency"], data["T"])

months = 12
# lifetimes' `customer_lifetime_value` counts a month as 4.345 weeks for `freq="W"`.
horizon_weeks = months * 4.345
sample = pd.concat([data.iloc[:10], data.iloc[10::90]])
profit = ggf.conditional_expected_average_profit(sample["frequency"], sample["monetary_value"])
clv = ggf.customer_lifetime_value(
    bgf, sample["frequency"], sample["recency"], sample["T"], sample["monetary_value"],
    time=months, discount_rate=0.0, freq="W",
)
rows = []
for cid, row in sample.iterrows():
    rows.append(
        {
            "customer": int(cid),
            "x": float(row["frequency"]),
            "t_x": float(row["recency"]),
            "T": float(row["T"]),
            "monetary_value": float(row["monetary_value"]),
            "expected_average_profit": float(profit.loc[cid]),
            "clv_12_months": float(clv.loc[cid]),
        }
    )
params = {k: float(v) for k, v in ggf.params_.items()}
bg = {k: float(v) for k, v in bgf.params_.items()}
out = pathlib.Path(__file__).parent / "fixtures" / "gammagamma_cdnow.json"
out.write_text(
    json.dumps(
        {"gamma_gamma": params, "bgnbd": bg, "horizon_weeks": horizon_weeks, "customers": rows},
        indent=1,
    )
    + "\n"
)
print(f"{len(rows)} customers written to {out}; Gamma-Gamma {params}; BG/NBD {bg}")
