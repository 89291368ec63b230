"""The study's comparison tables: curves per form and quality ratios paired by seed."""
import math

import pytest

from nrdm.lab.compare import curve_table, format_comparison, paired_ratios, ratio_table, verdict


def record(variant, seed, qualities, setting="digits-flow", depth=6, accuracy=0.9, loss=0.03):
    """A finished cell whose quality at steps 10, 20, ... is `qualities`."""
    curve = [{"step": 10 * (i + 1), "quality": q, "class_accuracy": accuracy, "loss": loss}
             for i, q in enumerate(qualities)]
    return {"setting": setting, "variant": variant, "depth": depth, "gamma": 0.0, "seed": seed, "metric": "FID",
            "curve": curve, "quality": qualities[-1], "final_loss": loss}


def test_ratios_pair_the_same_seed_and_step():
    records = [record("adaln-zero", 0, [2.0, 1.0]), record("adaln-zero", 1, [4.0, 0.5]),
               record("nrdm", 0, [6.0, 1.5]), record("nrdm", 1, [4.0, 1.0]),
               record("nrdm", 2, [9.0, 9.0])]                            # no reference seed 2: left out
    ratios = paired_ratios(records, "nrdm", "adaln-zero")
    assert [r["step"] for r in ratios] == [10, 20]
    assert ratios[0]["ratios"] == [3.0, 1.0] and ratios[1]["ratios"] == [1.5, 2.0]
    assert ratios[0]["mean"] == pytest.approx(2.0) and ratios[0]["std"] == pytest.approx(1.0)   # population std
    assert ratios[1]["mean"] == pytest.approx(1.75) and ratios[1]["std"] == pytest.approx(0.25)
    assert all(r["n"] == 2 for r in ratios)
    table = ratio_table(records, "adaln-zero")
    assert "| nrdm | 2 | 10: 2 +- 1 / 20: 1.75 +- 0.25 |" in table
    assert ratio_table(records, "resnet") is None                       # the reference did not run


def test_ratios_skip_non_positive_and_missing_qualities():
    records = [record("adaln-zero", 0, [1.0, -0.001]), record("rezero", 0, [2.0, 0.5])]
    records[1]["curve"].append({"step": 30, "quality": None})
    assert [(r["step"], r["ratios"]) for r in paired_ratios(records, "rezero", "adaln-zero")] == [(10, [2.0])]


def test_curve_table_states_every_seed_and_every_evaluation():
    records = [record("nrdm", 0, [8.0, 1.0], accuracy=0.8), record("nrdm", 1, [4.0, 3.0], accuracy=0.6),
               record("resnet", 0, [9.0, 2.0])]
    records[1]["quality"] = None                                         # a diverged seed
    table = curve_table(records).splitlines()
    nrdm = next(line for line in table if line.startswith("| nrdm"))
    assert "| nrdm | 2 | 1 (s0 1, s1 diverged) | 10: 6 / 20: 2 | 0.7 / 0.7 |" in nrdm
    resnet = next(line for line in table if line.startswith("| resnet"))
    assert "| resnet | 1 | 2 (s0 2) |" in resnet and "+-" not in resnet.split("|")[3]   # one seed: no spread


def test_comparison_groups_settings_and_depths():
    records = [record("adaln-zero", 0, [1.0]), record("nrdm", 0, [2.0]),
               record("adaln-zero", 0, [1.0], depth=12), record("nrdm", 0, [3.0], depth=12),
               record("nrdm", 0, [1.0], setting="fashion")]
    text = format_comparison(records)
    headings = [line for line in text.splitlines() if line.startswith("###")]
    assert headings == ["### digits-flow, depth 6, gamma 0", "### digits-flow, depth 12, gamma 0",
                        "### fashion, depth 6, gamma 0"]
    deep = text.split("### digits-flow, depth 12")[1].split("###")[0]
    assert "| nrdm | 1 | 10: 3 |" in deep
    assert "against adaln-zero" not in text.split("### fashion")[1]       # no reference there: no ratios
    assert math.isclose(paired_ratios(records[2:4], "nrdm", "adaln-zero")[0]["mean"], 3.0)


@pytest.mark.parametrize("mean, std, n, expected", [(0.8, 0.1, 3, "lower"), (0.8, 0.25, 3, "level"),
                                                    (1.3, 0.2, 3, "higher"), (1.3, 0.4, 3, "level"),
                                                    (0.5, 0.0, 1, "level")])
def test_verdict_needs_the_spread_to_exclude_one(mean, std, n, expected):
    assert verdict({"mean": mean, "std": std, "n": n}) == expected
