"""Analysis: the logistic fit on data with a known curve, the measures on hand-built tables,
the figures and report from a synthetic study, and bad input naming the file or column."""
import json
import re

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from analysis import AnalysisError, Thresholds, analyze, fit_logistic, load_results
from analysis.__main__ import main as analysis_main
from analysis.logistic import _lm_batch, _solve, _unpack
from analysis.measures import axis_spread, defender_pick, rank, summarize
from analysis.synthetic import curve, make_results, write_study
from analysis.table import budget_label

TRUE = (2.0, 97.0, 0.8, 91.0)   # L, U, k, c


def _noisy(n: int, noise: float, seed: int, true=TRUE):
    rng = np.random.default_rng(seed)
    acc = rng.uniform(80, 98, n)
    return acc, np.clip(curve(acc, *true) + rng.normal(0, noise, n), 0, 100)


# --- the fit ---------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_fit_recovers_midpoint_and_steepness_at_realistic_noise(seed):
    acc, asr = _noisy(120, 5.0, seed)
    fit = fit_logistic(acc, asr, n_boot=0)
    assert not fit.degenerate
    assert fit.c == pytest.approx(91.0, abs=0.5)
    assert fit.k == pytest.approx(0.8, rel=0.3)
    assert 0 <= fit.L <= fit.U <= 100 and fit.rmse < 7


def test_two_parameter_form_fixes_the_asymptotes():
    acc, asr = _noisy(80, 4.0, 0, true=(0.0, 100.0, 1.2, 90.0))
    fit = fit_logistic(acc, asr, form="2p", n_boot=50)
    assert (fit.L, fit.U) == (0.0, 100.0)
    assert fit.c == pytest.approx(90.0, abs=0.5) and fit.k == pytest.approx(1.2, rel=0.3)
    assert fit.param_ci["L"] == (0.0, 0.0) and fit.param_ci["U"] == (100.0, 100.0)


def test_bounds_hold_even_when_the_data_push_past_them():
    acc = np.linspace(80, 98, 40)
    asr = np.where(acc > 90, 130.0, -30.0)   # out-of-range targets: L >= 0 and U <= 100 must still hold
    fit = fit_logistic(acc, asr, n_boot=20)
    assert fit.L == pytest.approx(0.0, abs=1e-6) and fit.U == pytest.approx(100.0, abs=1e-6)
    assert fit.k > 0 and all(0 <= lo <= hi <= 100 for lo, hi in (fit.param_ci["L"], fit.param_ci["U"]))


def test_acc_at_asr_inverts_predict():
    acc, asr = _noisy(150, 4.0, 1)
    fit = fit_logistic(acc, asr, n_boot=0)
    levels = np.array([5.0, 20.0, 50.0, 80.0])
    assert fit.predict(fit.acc_at_asr(levels)) == pytest.approx(levels, abs=1e-6)
    xs = np.array([86.0, 90.0, 93.0])
    assert fit.acc_at_asr(fit.predict(xs)) == pytest.approx(xs, abs=1e-6)
    assert isinstance(fit.acc_at_asr(5.0), float) and fit.crossing(5.0) == "crosses"
    assert np.isnan(fit.acc_at_asr(fit.L - 0.5)) and np.isnan(fit.acc_at_asr(fit.U + 0.5))
    assert fit.crossing(fit.U + 0.5) == "always below" and fit.crossing(fit.L - 0.5) == "never"


def test_bootstrap_band_covers_the_true_curve_and_matches_per_resample_scipy_fits():
    acc, asr = _noisy(100, 5.0, 2)
    fit = fit_logistic(acc, asr, n_boot=200, seed=3)
    lo, hi = fit.band(fit.band_acc)
    assert (lo <= fit.predict(fit.band_acc) + 1e-6).all() and (fit.predict(fit.band_acc) <= hi + 1e-6).all()
    inside = (lo <= curve(fit.band_acc, *TRUE)) & (curve(fit.band_acc, *TRUE) <= hi)
    assert inside.mean() > 0.7
    lo_c, hi_c = fit.param_ci["c"]
    assert lo_c < fit.c < hi_c and hi_c - lo_c < 1.5
    # the batched solver lands where scipy's least_squares does, resample by resample
    p = np.array([fit.L, (fit.U - fit.L) / (100 - fit.L), fit.k, fit.c])
    idx = np.random.default_rng(0).integers(0, acc.size, (30, acc.size))
    batched = np.array(_unpack(_lm_batch(acc[idx], asr[idx], p, "4p").T, "4p")).T
    reference = np.array([_unpack(_solve(acc[i], asr[i], "4p", [p]), "4p") for i in idx])
    assert np.abs(batched[:, 3] - reference[:, 3]).max() < 0.05
    assert np.abs(batched[:, 2] / reference[:, 2] - 1).max() < 0.05


@pytest.mark.parametrize("acc, asr, reason", [
    ([90, 91, 92], [10, 50, 90], "too few points"),
    ([95.0] * 10, list(np.linspace(0, 100, 10)), "no spread in ACC"),
    (list(np.linspace(80, 98, 10)), [0.0, 0.3, 0.0, 0.5, 0.0, 1.0, 0.0, 0.2, 0.0, 0.0], "all ASR <= 1%"),
    (list(np.linspace(80, 98, 10)), [50.0] * 10, "no spread in ASR"),
    ([], [], "no points"),
])
def test_degenerate_data_is_flagged_not_fitted(acc, asr, reason):
    fit = fit_logistic(acc, asr)
    assert fit.degenerate and reason in fit.reason
    assert np.isnan(fit.c) and np.isnan(fit.predict([90.0])).all() and np.isnan(fit.acc_at_asr(5.0))
    assert fit.crossing(5.0) == "degenerate" and fit.to_dict()["params"]["c"] is None


def test_fit_rejects_bad_arguments():
    with pytest.raises(ValueError, match="lengths differ"):
        fit_logistic([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="form"):
        fit_logistic([1], [1], form="3p")
    with pytest.raises(ValueError, match="n_boot"):
        fit_logistic([1], [1], n_boot=-1)


# --- measures ----------------------------------------------------------------------------------

def _table(rows):
    df = pd.DataFrame(rows, columns=["trial_id", "defense", "lr", "subset_seed", "acc", "asr", "acc_drop", "status"])
    df["budget"], df["budget_value"], df["victim_id"] = "2%", 0.02, "v"
    return df


def test_safe_share_worst_case_and_failed_trials():
    df = _table([("a", "ft", 0.01, 0, 97.0, 3.0, 1.0, "finished"),     # safe
                 ("b", "ft", 0.02, 0, 94.0, 1.0, 4.0, "finished"),     # ASR fine, costs too much
                 ("c", "ft", 0.01, 1, 97.5, 40.0, 0.5, "finished"),    # backdoor kept
                 ("d", "ft", 0.02, 1, np.nan, np.nan, np.nan, "failed")])
    s = summarize(df, Thresholds())
    assert s["safe_share"] == pytest.approx(1 / 4) and s["failed"] == 1 and s["worst_asr"] == 40.0
    assert summarize(df, Thresholds(safe_drop=5.0))["safe_share"] == pytest.approx(2 / 4)
    assert summarize(df, Thresholds(safe_asr=50.0))["safe_share"] == pytest.approx(2 / 4)


def test_defender_pick_uses_clean_accuracy_only():
    df = _table([("a", "ft", 0.001, 0, 98.5, 95.0, 0.5, "finished"),
                 ("b", "ft", 0.01, 0, 97.2, 2.0, 1.8, "finished"),     # largest drop within 2 points
                 ("c", "ft", 0.1, 0, 90.0, 0.0, 9.0, "finished"),
                 ("d", "ft", 0.001, 1, 98.0, 90.0, 1.0, "finished"),
                 ("e", "ft", 0.01, 1, 95.0, 0.0, 4.0, "finished")])    # seed 1: only 'd' is within
    within = defender_pick(df, Thresholds())
    assert sorted(within["trial_id"]) == ["b", "d"]
    assert summarize(df, Thresholds())["pick_asr"] == pytest.approx((2.0 + 90.0) / 2)
    assert sorted(defender_pick(df, Thresholds(selection="max_acc"))["trial_id"]) == ["a", "d"]
    # nothing within the tolerance: the smallest drop
    assert list(defender_pick(df[df["trial_id"].isin(["c", "e"])], Thresholds())["trial_id"]) == ["c", "e"]


def test_axis_spread_is_range_and_std_of_per_value_means():
    df = _table([("a", "ft", 0.01, 0, 98.0, 90.0, 1.0, "finished"), ("b", "ft", 0.01, 1, 96.0, 70.0, 3.0, "finished"),
                 ("c", "ft", 0.1, 0, 90.0, 0.0, 9.0, "finished"), ("d", "ft", 0.1, 1, 88.0, 10.0, 11.0, "finished")])
    (lr,) = axis_spread(df)
    assert lr["axis"] == "lr" and lr["values"] == 2
    assert lr["acc_range"] == pytest.approx(97.0 - 89.0) and lr["acc_std"] == pytest.approx(4.0)
    assert lr["asr_range"] == pytest.approx(80.0 - 5.0) and lr["asr_std"] == pytest.approx(37.5)


def test_rank_orders_by_safe_share_then_pick_asr():
    rows = [{"defense": "x", "budget": "2%", "safe_share": 0.5, "pick_asr": 30.0, "worst_asr": 90.0},
            {"defense": "y", "budget": "2%", "safe_share": 0.5, "pick_asr": 10.0, "worst_asr": 99.0},
            {"defense": "z", "budget": "2%", "safe_share": 0.1, "pick_asr": 0.0, "worst_asr": 1.0},
            {"defense": "z", "budget": "all", "safe_share": 0.9, "pick_asr": 0.0, "worst_asr": 1.0}]
    assert [(r["defense"], r["rank"]) for r in rank(rows)] == [("z", 1), ("y", 2), ("x", 3)]


def test_budget_labels():
    assert budget_label("0.02", "") == "2%" and budget_label("", "10") == "10 shots" and budget_label("", "") == "data-free"


# --- the whole analysis on a synthetic study --------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic_study(tmp_path_factory):
    d = write_study(tmp_path_factory.mktemp("study"), 300)
    return d, analyze(d, n_boot=50, log=lambda m: None)


def test_analysis_writes_every_figure_as_a_non_blank_png(synthetic_study):
    d, out = synthetic_study
    names = {p.name for p in out["files"]}
    expected = {"tradeoff.png", "vs_lr.png", "vs_budget.png", "vs_generator_size.png", "vs_trigger_size.png",
                "trigger_x_generator.png", "amplified.png", "trajectories.png"}
    assert expected <= names and {"fits.json", "report.md"} <= names
    assert not any("node" in n or "retries" in n for n in names)   # bookkeeping columns are not axes
    for name in expected:
        img = matplotlib.image.imread(d / "plots" / name)
        h, w = img.shape[:2]
        assert 300 <= h <= 3000 and 400 <= w <= 4000, name
        assert img[..., :3].std() > 0.05, f"{name} looks blank"


def test_fits_json_and_report_carry_the_ranking_and_every_fit(synthetic_study):
    d, out = synthetic_study
    fits = json.loads((d / "fits.json").read_text())
    groups = {(f["defense"], f["budget"]) for f in fits["fits"]}
    assert ("ft", "1%") in groups and ("ft", "all") in groups and ("dhbe", "data-free") in groups
    ft = next(f for f in fits["fits"] if (f["defense"], f["budget"]) == ("ft", "4%"))
    assert ft["params"]["c"] == pytest.approx(93.0, abs=1.0) and ft["n_boot"] == 50 and not ft["degenerate"]
    assert fits["thresholds"] == {"safe_asr": 5.0, "safe_drop": 2.0, "selection": "within_drop", "min_victim_asr": 80.0}
    report = (d / "report.md").read_text()
    assert "## Ranking" in report and "| 1 |" in report
    for p in out["files"]:
        if p.suffix == ".png":
            assert f"](plots/{p.name})" in report
    # the ranking is by safe share: the synthetic DHBE is the only defence with safe trials
    assert out["ranking"][0]["defense"] == "dhbe" and out["ranking"][0]["safe_share"] > 0


def test_collapsed_models_can_be_left_out_of_the_fits(tmp_path):
    df = make_results(200)
    collapsed = df[df["defense"] == "ft"].head(12).assign(acc=20.0, asr=60.0, acc_drop=78.0)
    pd.concat([df, collapsed.assign(trial_id=[f"c{i}" for i in range(12)])]).to_csv(tmp_path / "results.csv",
                                                                                   index=False)
    kept = analyze(tmp_path, n_boot=0, make_plots=False, log=lambda m: None)["fits"][("ft", "all")]
    cut = analyze(tmp_path, n_boot=0, make_plots=False, fit_min_acc=50, log=lambda m: None)["fits"][("ft", "all")]
    assert cut.n == kept.n - 12 and cut.c == pytest.approx(93.0, abs=1.0) and kept.L > 5 > cut.L
    assert "left out of the fits (12 trials)" in (tmp_path / "report.md").read_text()


def test_cli_rebuilds_from_results_csv_alone_and_reports_a_defence_whose_trials_all_failed(tmp_path, capsys):
    df = make_results(120)
    failed = df[df["defense"] == "nad"].index
    df.loc[failed, ["acc", "asr", "acc_drop"]] = np.nan
    df.loc[failed, "status"] = "failed"
    df.to_csv(tmp_path / "results.csv", index=False)
    assert analysis_main([str(tmp_path), "--bootstrap", "10", "--selection", "max_acc"]) == 0
    report = (tmp_path / "report.md").read_text()
    assert (tmp_path / "plots" / "tradeoff.png").exists()
    assert not (tmp_path / "plots" / "trajectories.png").exists()   # no epochs.csv: that figure is skipped
    assert "no `epochs.csv`" in report
    # the defence whose trials all failed: ranked last at a 0% safe share, its fits empty, its trials counted
    ranking = [line for line in capsys.readouterr().out.splitlines() if re.match(r"\d+\. ", line)]
    assert re.match(rf"{len(ranking)}\. nad +safe +0% ", ranking[-1]), ranking
    fits = {(f["defense"], f["budget"]): f for f in json.loads((tmp_path / "fits.json").read_text())["fits"]}
    assert fits[("nad", "1%")]["reason"] == "no points" and fits[("ft", "1%")]["reason"] == ""
    assert f"{len(failed)} ({len(failed)} failed)" in report


# --- bad input -----------------------------------------------------------------------------------

def _bad(tmp_path, text: str | None):
    if text is not None:
        (tmp_path / "results.csv").write_text(text)
    return tmp_path


HEADER = "trial_id,defense,status,acc,asr,acc_drop\n"


@pytest.mark.parametrize("text, message", [
    (None, "results.csv: no such file"),
    ("", "the file is empty"),
    (HEADER, "header but no trials"),
    ("trial_id,defense,status,acc\na,ft,finished,90\n", "missing required column(s) 'asr', 'acc_drop'"),
    (HEADER + "a,ft,finished,90,abc,1\n", "column 'asr', line 2: 'abc' is not a number"),
    (HEADER + "a,ft,finished,90,3,1\nb,ft,finished,,3,1\n", "column 'acc', line 3: empty for a finished trial"),
    (HEADER + "a,ft,failed,,,\n", "no finished trials"),
])
def test_bad_results_are_errors_naming_the_file_and_column(tmp_path, capsys, text, message):
    d = _bad(tmp_path, text)
    with pytest.raises(AnalysisError) as err:
        load_results(d)
    assert message in str(err.value) and "results.csv" in str(err.value)
    assert analysis_main([str(d)]) == 2
    assert message in capsys.readouterr().err
    assert not (d / "report.md").exists()


def test_bad_thresholds_and_epochs_file_are_named(tmp_path, capsys):
    make_results(60).to_csv(tmp_path / "results.csv", index=False)
    assert analysis_main([str(tmp_path), "--safe-asr", "150"]) == 2
    assert "safe_asr" in capsys.readouterr().err
    assert analysis_main([str(tmp_path), "--fit-min-acc", "100"]) == 2
    assert "fit_min_acc" in capsys.readouterr().err
    assert analysis_main([str(tmp_path), "--bootstrap", "-1"]) == 2
    assert "--bootstrap" in capsys.readouterr().err
    (tmp_path / "epochs.csv").write_text("trial_id,acc\nx,1\n")
    assert analysis_main([str(tmp_path)]) == 2
    assert "epochs.csv: missing required column(s) 'epoch', 'asr'" in capsys.readouterr().err


def test_an_mlflow_store_that_does_not_exist_is_named_and_not_created(tmp_path, capsys):
    missing = tmp_path / "nowhere.db"
    rc = analysis_main(["--mlflow-uri", f"sqlite:///{missing}", "--experiment", "quick", "--out", str(tmp_path / "a")])
    assert rc == 2 and f"no sqlite store at '{missing}'" in capsys.readouterr().err
    assert not missing.exists() and not (tmp_path / "a").exists()


def test_rebuilding_from_mlflow_into_a_study_directory_is_refused(tmp_path, capsys):
    study = tmp_path / "study"
    study.mkdir()
    (study / "state.json").write_text("{}")
    (study / "results.csv").write_text("trial_id\nabc\n")
    rc = analysis_main(["--mlflow-uri", f"sqlite:///{tmp_path / 'x.db'}", "--experiment", "quick", "--out", str(study)])
    assert rc == 2 and "is a study's directory (state.json)" in capsys.readouterr().err
    assert (study / "results.csv").read_text() == "trial_id\nabc\n"
