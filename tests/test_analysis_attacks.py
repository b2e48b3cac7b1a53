"""The attack as an axis of the analysis: per-attack fits and measures, the attack x defence
figure and report section, and empty (non-patch) amplified ASR kept out of means and plots."""
import contextlib
import io
import json

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

import analysis.__main__ as analysis_cli
from analysis import Thresholds, analyze, load_results
from analysis.attacks import amplified_groups, attack_table
from analysis.measures import rank
from analysis.synthetic import make_results

ATTACKS = ["badnets", "sig", "wanet"]


def _write(tmp_path, df: pd.DataFrame):
    df.to_csv(tmp_path / "results.csv", index=False)
    return tmp_path


def _multi(tmp_path, n: int = 360):
    """Three attacks (sig, wanet: no amplified ASR); NAD not run on wanet; FT loses 3 BadNets
    trials at 1% (unequal group sizes); 4 DHBE trials on SIG failed."""
    df = make_results(n, attacks=ATTACKS)
    df = df[~((df["attack"] == "wanet") & (df["defense"] == "nad"))]
    ft = df.index[(df["attack"] == "badnets") & (df["defense"] == "ft") & (df["clean_fraction"] == 0.01)]
    df = df.drop(ft[:3])
    failed = df.index[(df["attack"] == "sig") & (df["defense"] == "dhbe")][:4]
    df.loc[failed, "status"] = "failed"
    df.loc[failed, ["acc", "asr", "acc_drop", "asr_x4", "asr_x9"]] = np.nan
    return _write(tmp_path, df.reset_index(drop=True))


@pytest.fixture(scope="module")
def multi_cli(tmp_path_factory):
    """`python -m analysis` run once on the three-attack table (plots included, no bootstrap):
    (directory, exit code, what it printed, what `analyze` returned to it)."""
    d = _multi(tmp_path_factory.mktemp("multi"))
    returned = {}

    def spy(*args, **kwargs):
        returned.update(analyze(*args, **kwargs))
        return returned

    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setattr(analysis_cli, "analyze", spy)
        code = analysis_cli.main([str(d), "--bootstrap", "0"])
    return d, code, printed.getvalue(), returned


# --- fits and measures --------------------------------------------------------------------------

def test_several_attacks_give_one_fit_per_defence_budget_and_attack(multi_cli):
    d, code, _, out = multi_cli
    assert code == 0
    raw = pd.read_csv(d / "results.csv", keep_default_na=False, dtype=str)
    fits, summaries, ranking = out["fits"], out["summaries"], out["ranking"]
    done = raw[raw["status"] == "finished"]
    budget = done["clean_fraction"].map(lambda f: f"{float(f) * 100:g}%" if f else "data-free")
    expected = done.groupby([done["defense"], budget, done["attack"]]).size()
    pooled = done[budget != "data-free"].groupby(["defense", "attack"]).size()
    want = {**{k: n for k, n in expected.items()}, **{(d, "all", a): n for (d, a), n in pooled.items()}}
    assert {k: f.n for k, f in fits.items()} == want
    assert fits[("ft", "1%", "badnets")].n == fits[("ft", "1%", "sig")].n - 3
    assert ("nad", "1%", "wanet") not in fits and ("dhbe", "data-free", "sig") in fits
    assert {(s["defense"], s["budget"], s["attack"]) for s in summaries} == set(want)
    # ranked per attack: each attack's defences numbered 1..n
    for attack in ATTACKS:
        ranks = [s["rank"] for s in ranking if s["attack"] == attack]
        assert ranks == list(range(1, len(raw.loc[raw["attack"] == attack, "defense"].unique()) + 1))


def test_one_attack_keeps_the_fits_json_without_an_attack_field(tmp_path):
    df = make_results(150)
    runs = {"column": df, "no column": df.drop(columns="attack")}
    texts = {}
    for name, table in runs.items():
        d = tmp_path / name.replace(" ", "_")
        d.mkdir()
        out = analyze(_write(d, table), n_boot=0, make_plots=False, log=lambda m: None)
        assert all(len(k) == 2 for k in out["fits"]) and not any("attack" in s for s in out["summaries"])
        texts[name] = (d / "fits.json").read_text()
        assert "## Attacks" not in (d / "report.md").read_text()
    fits = json.loads(texts["column"])["fits"]
    assert {tuple(sorted(f)) for f in fits} == {("acc_at_safe_asr", "acc_range", "budget", "ci_level", "crossing",
                                                   "defense", "degenerate", "form", "n", "n_boot", "param_ci",
                                                   "params", "reason", "rmse")}
    assert texts["column"] == texts["no column"]


def test_rank_numbers_defences_within_each_attack():
    rows = [{"defense": "x", "budget": "all", "attack": "a", "safe_share": 0.1, "pick_asr": 1.0, "worst_asr": 1.0},
            {"defense": "y", "budget": "all", "attack": "a", "safe_share": 0.9, "pick_asr": 1.0, "worst_asr": 1.0},
            {"defense": "x", "budget": "all", "attack": "b", "safe_share": 0.5, "pick_asr": 1.0, "worst_asr": 1.0},
            {"defense": "y", "budget": "all", "attack": "b", "safe_share": 0.2, "pick_asr": 1.0, "worst_asr": 1.0}]
    assert [(r["attack"], r["defense"], r["rank"]) for r in rank(rows)] == [
        ("a", "y", 1), ("a", "x", 2), ("b", "x", 1), ("b", "y", 2)]


# --- attack x defence -----------------------------------------------------------------------------

def test_attack_table_safe_share_and_pick_match_a_direct_count(tmp_path):
    raw = pd.read_csv(_multi(tmp_path) / "results.csv")
    th = Thresholds(safe_asr=20.0, selection="max_acc")
    t = attack_table(load_results(tmp_path), th)
    cell = raw[(raw["attack"] == "sig") & (raw["defense"] == "dhbe")]
    safe = ((cell["status"] == "finished") & (cell["asr"] <= 20.0) & (cell["acc_drop"] <= 2.0)).sum() / len(cell)
    assert 0 < safe < 1 and (cell["status"] == "failed").sum() == 4
    assert t.safe_share.loc["sig", "dhbe"] == pytest.approx(safe)
    done = cell[cell["status"] == "finished"]
    best = done.loc[done.groupby(["victim_id", "subset_seed"])["acc"].idxmax(), "asr"]
    assert t.pick_asr.loc["sig", "dhbe"] == pytest.approx(best.median())
    assert np.isnan(t.safe_share.loc["wanet", "nad"]) and t.trials.loc["wanet", "nad"] == 0
    assert t.trials.loc["badnets", "ft"] == len(raw[(raw["attack"] == "badnets") & (raw["defense"] == "ft")])
    assert attack_table(load_results(_write(tmp_path, make_results(60))), th) is None


def test_cli_draws_the_heat_map_and_attacks_section_with_several_attacks(multi_cli):
    multi, code, printed, _ = multi_cli
    assert code == 0
    png = multi / "plots" / "attack_x_defense.png"
    assert matplotlib.image.imread(png)[..., :3].std() > 0.05
    assert all(f"{a} 1. " in printed for a in ATTACKS)   # the ranking, per attack
    entries = json.loads((multi / "fits.json").read_text())["fits"]
    assert {e["attack"] for e in entries} == set(ATTACKS) and list(entries[0])[:3] == ["defense", "budget", "attack"]
    report = (multi / "report.md").read_text()
    assert "](plots/attack_x_defense.png)" in report
    assert report.index("## Attacks") < report.index("## Ranking") < report.index("## Per data budget")
    raw = pd.read_csv(multi / "results.csv")
    cell = raw[(raw["attack"] == "sig") & (raw["defense"] == "dhbe")]
    safe = ((cell["status"] == "finished") & (cell["asr"] <= 5.0) & (cell["acc_drop"] <= 2.0)).mean()
    section = report[report.index("## Attacks"):report.index("## Ranking")].splitlines()
    header = next(line for line in section if line.startswith("| attack |")).strip("|").split("|")
    cells = {line.split("|")[1].strip(): dict(zip(header, line.strip("|").split("|")))
             for line in section if line.startswith("| ") and not line.startswith("| attack |")}
    assert 0 < safe < 1 and cells["sig"][" dhbe "].strip().startswith(f"{safe * 100:.0f}% / ")
    assert cells["wanet"][" nad "].strip() == "" and cells["badnets"][" nad "].strip() != ""


# --- amplified ASR: empty for non-patch attacks, never 0 ---------------------------------------------

def test_empty_amplified_asr_is_skipped_not_zero(tmp_path):
    df = load_results(_multi(tmp_path))
    sig = df[(df["attack"] == "sig") & (df["status"] == "finished")]
    assert sig["asr_x4"].isna().all() and sig["asr_x9"].isna().all()
    amp = amplified_groups(df)
    assert {a for _, a, _ in amp.groups} == {"badnets"} and ("dhbe", "sig") in amp.skipped
    rows = next(r for d, a, r in amp.groups if (d, a) == ("ft", "badnets"))
    assert len(rows) == len(df[(df["defense"] == "ft") & (df["attack"] == "badnets")])


def test_report_amplified_means_skip_empty_cells_and_one_attack_draws_no_attack_figure(tmp_path):
    df = make_results(120)
    ft = df.index[df["defense"] == "ft"]
    df.loc[ft[::2], "asr_x4"] = np.nan   # half of FT without x4: the mean is over the other half
    df.loc[df["defense"] == "fp", ["asr_x4", "asr_x9"]] = np.nan
    out = analyze(_write(tmp_path, df), n_boot=0, log=lambda m: None)
    report = (tmp_path / "report.md").read_text()
    section = report[report.index("## Amplified triggers"):report.index("## Trigger size")].splitlines()
    kept = pd.to_numeric(df.loc[ft[1::2], "asr_x4"])
    ft_row = next(line for line in section if line.startswith("| ft |"))
    assert ft_row.split("|")[3].strip() == f"{kept.mean():.2f} ({kept.max():.2f})"
    assert not any(line.startswith("| fp |") for line in section)
    assert "Left out (no amplified ASR in any trial; e.g. not a patch attack): fp." in report
    assert (tmp_path / "plots" / "amplified.png").exists()
    # one attack: every other figure, but no attack x defence heat map
    assert not (tmp_path / "plots" / "attack_x_defense.png").exists()
    assert "attack_x_defense.png" not in {p.name for p in out["files"]} and "tradeoff.png" in {p.name for p in out["files"]}


def test_no_amplified_asr_at_all_means_no_figure_and_no_table(tmp_path):
    df = make_results(120, attacks=["sig", "wanet"])
    out = analyze(_write(tmp_path, df), n_boot=0, log=lambda m: None)
    assert "amplified" not in {p.stem for p in out["files"]} and not (tmp_path / "plots" / "amplified.png").exists()
    assert "No amplified-trigger ASR in the table." in (tmp_path / "report.md").read_text()
    assert amplified_groups(load_results(tmp_path)) is None

