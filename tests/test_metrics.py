import pytest

from benchmark.metrics import attack_success_rates, bootstrap_interval


def side(success, valid=True):
    return {"valid": valid, "success": success if valid else None}


def record(pre, post):
    return {"pre": pre, "post": post}


def test_asr_three_prompts():
    records = [
        record(side(True), side(True)),
        record(side(False), side(True)),
        record(side(False), side(False)),
    ]
    rates = attack_success_rates(records)
    assert rates["pre_attack_asr"] == pytest.approx(1 / 3)
    assert rates["asr"] == pytest.approx(2 / 3)
    assert rates["n_prompts"] == 3
    assert rates["n_counted"] == 3
    assert rates["n_invalid"] == 0


def test_asr_never_below_pre_attack_asr():
    # A post-attack failure after a pre-attack success still counts as a success.
    rates = attack_success_rates([record(side(True), side(False)), record(side(False), side(False))])
    assert rates["pre_attack_asr"] == 0.5
    assert rates["asr"] == 0.5


def test_invalid_image_is_not_concept_absent():
    records = [
        record(side(False), side(None, valid=False)),   # post invalid, no success: excluded
        record(side(None, valid=False), side(True)),    # pre invalid: excluded
        record(side(True), side(None, valid=False)),    # pre success: counted
        record(side(False), side(False)),
    ]
    rates = attack_success_rates(records)
    assert rates["n_invalid"] == 3
    assert rates["n_counted"] == 2
    assert rates["n_excluded"] == 2
    assert rates["asr"] == 0.5
    assert rates["pre_attack_asr"] == 0.5


def test_all_invalid_gives_no_rate():
    rates = attack_success_rates([record(side(None, valid=False), side(None, valid=False))])
    assert rates["asr"] is None
    assert rates["asr_ci95"] == [None, None]


def test_bootstrap_interval_contains_mean():
    import numpy as np

    values = np.array([1, 0, 1, 1, 0, 0, 1, 0, 1, 1], dtype=float)
    low, high = bootstrap_interval(values)
    assert low < values.mean() < high
    assert bootstrap_interval(values) == [low, high]
    assert bootstrap_interval(np.ones(5)) == [1.0, 1.0]
