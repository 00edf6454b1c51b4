"""healnet_risk_score's buckets follow the served model's survival bins; for 4 bins they are the ones the
dashboards and alert rules (k8s/components/monitoring) were written for."""

from __future__ import annotations

from prometheus_client import REGISTRY

from serving import metrics


def risk_bucket_bounds() -> list[str]:
    """The `le` labels of healnet_risk_score_bucket, as /metrics exports them."""
    return [
        sample.labels["le"]
        for family in REGISTRY.collect()
        if family.name == "healnet_risk_score"
        for sample in family.samples
        if sample.name == "healnet_risk_score_bucket"
    ]


def test_four_bins_give_the_buckets_of_the_dashboards():
    assert metrics.risk_buckets(4) == tuple(-4.0 + 0.25 * step for step in range(17))
    metrics.RISK_SCORE.follow(4)
    assert risk_bucket_bounds() == [str(-4.0 + 0.25 * step) for step in range(17)] + ["+Inf"]


def test_the_buckets_follow_the_number_of_bins_of_the_served_model():
    try:
        metrics.RISK_SCORE.follow(2)
        bounds = risk_bucket_bounds()
        assert (bounds[0], bounds[1], bounds[-2], len(bounds)) == ("-2.0", "-1.875", "0.0", 18)
        metrics.RISK_SCORE.observe(-1.9)
        assert REGISTRY.get_sample_value("healnet_risk_score_bucket", {"le": "-1.875"}) == 1
        assert REGISTRY.get_sample_value("healnet_risk_score_count") == 1
    finally:
        metrics.RISK_SCORE.follow(4)
    assert risk_bucket_bounds()[0] == "-4.0"
