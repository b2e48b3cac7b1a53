"""CLI: `python -m study.fidelity` (see the package docstring and `--help`)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from backdoor.cli_args import device_args, refuse_renamed
from backdoor.runtime import PRECISIONS

from . import PRESETS, ROWS, Settings, run_fidelity
from .report import write_report
from .rows import defense_config, victim_spec
from .run import check_settings

EPILOG = "rows:\n" + "\n".join(f"  {r.id:18s} {r.source}: {r.note}" for r in ROWS.values()) + """

Exit code 0: the selected rows are recorded (whatever their verdicts); 1: a row failed (recorded as
failed, the other rows ran); 2: bad input (the message names the flag); 3: stopped by --time-limit
("incomplete": run the same command again to continue; victim training, DHBE and NFT continue from
their checkpoints in the cache, FT / FP / NAD start their row again). Rows already in OUT/fidelity.json
are skipped: run it again to resume, or row by row with --rows. At --schedule-scale 1 each finished
row is also written to OUT/rows/ROW.json: copy those into docs/fidelity/ and run --report docs/fidelity.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m study.fidelity", description=__doc__.split("\n")[0] + " Re-measures "
                                "the NFT / DHBE papers' headline rows and gives a verdict per row.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                                parents=[device_args(compile_what="victim training")])
    p.add_argument("--table", default="paper", choices=sorted(PRESETS),
                   help="which table: " + "; ".join(f"{k}: {v}" for k, v in PRESETS.items()) + " (default paper)")
    p.add_argument("--rows", nargs="+", default=None, metavar="ROW",
                   help="rows to run (default: all; a derived row brings the rows it reads); comma lists work too")
    p.add_argument("--data-root", default=None, help="CIFAR-10: an image folder (train/, test/) or torchvision's copy")
    p.add_argument("--dataset", default="auto", choices=["auto", "imagefolder", "cifar10"],
                   help="how --data-root is read (default: from its layout)")
    p.add_argument("--out", default=None, help="output directory (default: runs/fidelity[-tiny][-xSCALE])")
    p.add_argument("--cache-dir", default=None, help="victim cache (default: $BACKDOOR_CACHE/victims)")
    p.add_argument("--schedule-scale", type=float, default=1.0, metavar="F",
                   help="multiply every schedule (victim epochs, DHBE epochs, NFT steps, FT epochs) by F in (0, 1] "
                        "for a first look; recorded beside every row")
    p.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="evaluate every N epochs / rounds (default: about 10 times per defence, always the last)")
    p.add_argument("--nft-model", default=None, choices=["resnet18", "preact_resnet18"],
                   help="network of the NFT rows' victims (default resnet18, as NFT's reference code)")
    p.add_argument("--mlflow-uri", default=None, help="also log each row as an MLflow run (if MLflow is installed)")
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                   help="the defences' arithmetic on CUDA: fp32 (default: as the NFT and DHBE reference code) or bf16 "
                        "autocast (faster); victims always train with bf16 autocast on CUDA; the CPU runs fp32")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop cleanly before this many seconds from the start (exit 3), progress checkpointed")
    p.add_argument("--report", default=None, metavar="DIR",
                   help="run nothing: regenerate DIR/README.md from the full-scale row files DIR/*.json")
    p.add_argument("--force", action="store_true", help="run the selected rows even if already recorded")
    p.add_argument("--dry-run", action="store_true", help="print what each row would run; run nothing")
    refuse_renamed(p, argv, "study.fidelity")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    names = [n for item in a.rows for n in item.split(",") if n] if a.rows else None
    scale_tag = "" if a.schedule_scale == 1 else f"-x{a.schedule_scale:g}"
    out = Path(a.out) if a.out else Path("runs") / f"fidelity{'-tiny' if a.table == 'tiny' else ''}{scale_tag}"
    settings = Settings(preset=a.table, rows=names, data_root=a.data_root, dataset=a.dataset, out=out,
                        cache_dir=a.cache_dir, device=a.device, schedule_scale=a.schedule_scale,
                        eval_every=a.eval_every, compile=a.compile,
                        nft_model=a.nft_model, mlflow_uri=a.mlflow_uri, force=a.force, time_limit=a.time_limit,
                        precision=a.precision)
    log = lambda m: print(m, flush=True)  # noqa: E731
    try:
        if a.report is not None:
            log(f"wrote {write_report(Path(a.report))}")
            return 0
        if names == []:
            raise ValueError(f"--rows: no row name in {' '.join(a.rows)!r}; see --help for the rows")
        if a.dry_run:
            return dry_run(settings, log)
        return run_fidelity(settings, log=log)
    except ValueError as err:  # FidelityError, or a bad --rows name: the message names the flag
        print(f"error: {err}", file=sys.stderr)
        return 2


def dry_run(settings: Settings, log) -> int:
    """What each selected row would run (victim spec, defence config, clean data), nothing more."""
    rows, dataset, data_text = check_settings(settings)
    log(f"fidelity (dry run): table {settings.preset}, {data_text}, schedule scale {settings.schedule_scale:g}")
    for row in rows:
        if row.defense is None:
            log(f"  {row.id}: derived from {', '.join(row.derived_from)}")
            continue
        spec = victim_spec(row, settings.preset, dataset, settings.schedule_scale, settings.nft_model)
        log(f"  {row.id}: victim {row.victim} {json.dumps(spec.to_dict())}")
        log(f"      {row.defense} {json.dumps(defense_config(row, settings.preset, settings.schedule_scale))}"
            + (f", clean {row.clean_fraction:g} ({row.clean_rule})" if row.clean_fraction else ", data-free")
            + f"; paper {row.paper_before} -> {row.paper_after}")
        if row.schedule_source:
            log(f"      schedule: {row.schedule_source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
