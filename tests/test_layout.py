import subprocess
import sys


def test_top_level_packages_import():
    import analysis, backdoor, search_spaces, study, trainables  # noqa: F401


def test_backdoor_library_never_imports_ray_mlflow_optuna():
    code = ("import sys, backdoor.data, backdoor.models, backdoor.attacks, backdoor.metrics, backdoor.victims, "
            "backdoor.train, backdoor.defenses, backdoor.purify, backdoor.recipes, backdoor.packing, analysis; bad = [m for m in ('ray', 'mlflow', 'optuna') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
