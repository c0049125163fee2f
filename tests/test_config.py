import pytest
from pydantic import ValidationError

from sere.config import SereConfig


def test_defaults_are_valid():
    config = SereConfig()
    assert config.policy == "sere" and config.scope == "ep_group"
    config.check_model(top_k=8, num_experts=64)


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("policy", "magic", "policy='magic'"),
        ("threshold", 1.5, "threshold=1.5"),
        ("threshold", -0.1, "threshold=-0.1"),
        ("threshold_quantile", 2.0, "threshold_quantile=2.0"),
        ("scope", "galaxy", "scope='galaxy'"),
        ("num_primary", 0, "num_primary"),
        ("tolerance", 0.0, "tolerance=0.0"),
        ("keep_cost", -1.0, "keep_cost"),
        ("bogus_field", 1, "bogus_field"),
    ],
)
def test_bad_field_is_named_with_its_value(field, value, fragment):
    with pytest.raises(ValidationError) as info:
        SereConfig(**{field: value})
    assert fragment in str(info.value)


def test_num_primary_must_be_below_top_k():
    with pytest.raises(ValueError, match="num_primary=8 must be smaller than the model's top_k=8"):
        SereConfig(num_primary=8).check_model(top_k=8, num_experts=64)


def test_threshold_and_quantile_are_exclusive():
    with pytest.raises(ValidationError, match="either threshold"):
        SereConfig(threshold=0.5, threshold_quantile=0.2)
