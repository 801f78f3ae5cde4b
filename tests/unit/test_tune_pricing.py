"""Pricing tables: a price that is not a finite positive number is refused with its file, line and field."""

from __future__ import annotations

import pytest

from ftune.errors import ConfigError
from tune.config import ComputeConfig
from tune.pricing import TrialShape, hourly_rate, load_pricing, pricing_problems

TABLE = """\
currency: USD
instance_types:
  ok: {gpus: 0, cpus: 1, per_worker: true, on_demand: 0.048, spot: 0.02}
  free-lunch:
    cpus: 1
    on_demand: {on_demand}
    spot: {spot}
"""


def write(tmp_path, on_demand: str, spot: str):
    path = tmp_path / "pricing.yaml"
    path.write_text(TABLE.replace("{on_demand}", on_demand).replace("{spot}", spot))
    return path


@pytest.mark.parametrize("on_demand, spot, bad", [
    (".inf", "0.5", ["on_demand"]),
    ("1.0", ".nan", ["spot"]),
    ("-2.0", "-.inf", ["on_demand", "spot"]),
    ("'inf'", "0.5", ["on_demand"]),
])
def test_non_finite_or_negative_prices_are_refused_naming_file_and_field(tmp_path, on_demand, spot, bad):
    path = write(tmp_path, on_demand, spot)
    with pytest.raises(ConfigError) as error:
        load_pricing(path)
    message = str(error.value)
    for field in bad:
        line = {"on_demand": 6, "spot": 7}[field]
        assert f"{path}:{line}: instance_types.free-lunch.{field}: " in message, message
        assert f"{field} is not a price" in message, message
    assert message.count("is not a price") == len(bad), message


def test_a_bad_table_is_a_compute_problem_of_the_sweep(tmp_path):
    path = write(tmp_path, ".inf", "0.5")
    problems = pricing_problems(ComputeConfig(pricing=str(path), instance_type="ok"))
    assert problems and problems[0][0] == "compute.pricing" and "on_demand is not a price" in problems[0][1]


def test_finite_prices_give_the_hourly_rate(tmp_path):
    path = write(tmp_path, "1.0", "0.5")
    shape = TrialShape(workers=2, cpus_per_worker=1, gpus_per_worker=0, driver_cpus=0.5)
    assert hourly_rate(ComputeConfig(pricing=str(path), instance_type="ok"), shape) == pytest.approx(0.096)
    assert hourly_rate(ComputeConfig(pricing=str(path), instance_type="free-lunch", market="spot"), shape) == \
        pytest.approx(0.5 * 2.5)
