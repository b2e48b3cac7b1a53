"""Study specs: YAML in, validated `StudySpec` and its trial grid out.

    name: quick
    victims:                       # VictimSpec fields (backdoor.victims), or a paper's recipe plus overrides
      - {dataset: digits, model: small_cnn, attack: badnets, attack_params: {trigger_size: 3}}
      - {recipe: dhbe-badnets-3x3, pool_fraction: 0.1}      # backdoor.recipes.PAPER_VICTIMS
      - recipe: nft-badnets        # one entry, three victims that differ only in the attack:
        attacks:                   # a name (its default attack_params) or a mapping of attack fields
          - blend
          - {attack: badnets, attack_params: {trigger_size: 3}}
          - {attack: blend, attack_params: {alpha: 0.1}, poison_rate: 0.05}
    defenses:
      - name: ft
        config: {epochs: 10}       # fixed overrides of the defence's config
        sweep:                     # axes (search_spaces.axes): generic (lr, lam, threshold, margin, radius,
                                   # generator_size) or config fields
          lr: {log: [0.002, 0.1, 3]}
      - name: nft
        victims: [2, 3, 4]         # indices into the EXPANDED victims: 0, 1, then the attacks of entry 2
    clean: {fractions: [0.014], shots: [10], subset_seeds: [0, 1]}   # rule: balanced (default) | first
    resources: {cpu: 1, gpu: 0}    # per trial; fractional GPUs share a card
    tracking: {experiment: quick}  # MLflow experiment (default: the study name)
    failures: {max_retries: 2}     # a trial whose worker dies (node lost) runs again up to 2 times
    pack: 1                        # up to this many compatible trials train as one computation (backdoor.packing)
    min_victim_asr: 80             # a victim below this ASR (%) has no backdoor: warned, its trials labelled so

A victim made elsewhere is an entry `{backdoorbench: PATH, data_root: DIR, bb_root: DIR}` or
`{checkpoint: FILE, model: NAME, dataset: NAME, attack: ... | poisoned_test: DIR}`
(`backdoor.imports`); the file's SHA-256 is part of its trials' ids.

`attacks:` expands its entry, in place and in order, into one victim per element before
anything is validated (so `defenses[i].victims` and the dry run count the expanded list). An
element sets only the attack fields (ATTACK_FIELDS): `attack` (required), `attack_params`
(default {}: the attack's own defaults, never the entry's or the recipe's), `target`,
`target_mode`, `poison_rate`, `poison_count`; the entry (and its recipe) gives the rest. An
element's `poison_rate` without `poison_count` clears a `poison_count` the entry or recipe set
(so the rate it names is the one used). The entry itself may not set `attack` or
`attack_params`, and two elements may not make the same victim.

Everything is checked before anything runs; errors name the field (`defenses[1].sweep.lr: ...`,
`victims[2].attacks[1].attack_params: ...`).
A trial is one (victim, defence, swept values, clean budget, subset seed); its id is a hash
of exactly those, so a resumed study recognises the trials it has already finished (a victim
from `attacks:` has the id it would have had written out as its own entry).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from backdoor.data import CLEAN_RULES
from backdoor.defenses import DEFENSES, build_defense
from backdoor.imports import ImportSpec
from backdoor.victims import VictimSpec
from backdoor.weak_victim import MIN_VICTIM_ASR, check_threshold
from search_spaces import Axis, config_field, parse_axis

from .errors import SpecError
from .spec_victims import ATTACK_FIELDS, attack_label, parse_victim_entry
from .trial import Trial, trial_id

PRESETS = Path(__file__).parent / "presets"
TOP_KEYS = {"name", "description", "victims", "defenses", "clean", "resources", "tracking", "max_concurrent",
            "failures", "pack", "min_victim_asr"}


# trials per pack when a spec does not say (`pack:`): see the README's "Packed trials" for the measurements
DEFAULT_PACK = 1


@dataclass
class DefenseSpec:
    name: str
    config: dict[str, Any]
    sweep: dict[str, Axis]
    fields: dict[str, str]         # axis name -> config field it sets
    victims: list[int] | None = None  # indices into the study's victims (None: all)

    @property
    def needs_clean_data(self) -> bool:
        return DEFENSES[self.name].needs_clean_data


@dataclass
class StudySpec:
    name: str
    victims: list[VictimSpec | ImportSpec]
    defenses: list[DefenseSpec]
    fractions: list[float] = field(default_factory=list)
    shots: list[int] = field(default_factory=list)
    subset_seeds: list[int] = field(default_factory=lambda: [0])
    cpu: float = 1.0
    gpu: float = 0.0
    experiment: str = ""
    max_concurrent: int | None = None
    max_retries: int = 2           # re-runs of a trial whose actor died; an error inside a trial is recorded
    pack: int = 1                  # trials per pack (study.packs); 1 = every trial alone
    clean_rule: str = "balanced"   # how clean subsets are drawn (backdoor.data.clean_subset)
    min_victim_asr: float = MIN_VICTIM_ASR   # below it a victim's backdoor did not take (backdoor.weak_victim)
    description: str = ""
    raw: dict = field(default_factory=dict)   # the spec as read (written back as study.yaml)
    victim_sources: list[str] = field(default_factory=list)  # per victim: `victims[0]` or `victims[0].attacks[2]`

    def budgets(self, defense: DefenseSpec) -> list[tuple[float | None, int | None]]:
        """(clean_fraction, shots) pairs a defence runs at; data-free defences get one, (None, None)."""
        if not defense.needs_clean_data:
            return [(None, None)]
        return [(f, None) for f in self.fractions] + [(None, s) for s in self.shots]


def _normal(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def expand_trials(spec: StudySpec) -> list[Trial]:
    """The full grid, in a stable order: victim x defence x swept values x budget x subset seed."""
    trials = []
    seen: set[str] = set()
    for vi, victim in enumerate(spec.victims):
        for d in spec.defenses:
            if d.victims is not None and vi not in d.victims:
                continue
            names = list(d.sweep)
            for values in itertools.product(*(d.sweep[n].grid() for n in names)):
                axes = dict(zip(names, values))
                config = {**d.config, **{d.fields[n]: v for n, v in axes.items()}}
                defaults = dataclasses.asdict(DEFENSES[d.name].Config())
                # a value equal to the default is the same trial as leaving it out (dedupes sweeps)
                config = {k: v for k, v in config.items() if _normal(v) != _normal(defaults[k])}
                for fraction, shots in spec.budgets(d):
                    for seed in spec.subset_seeds:
                        key = {"victim": victim.to_dict(), "defense": d.name, "config": config,
                               "clean_fraction": fraction, "shots": shots, "subset_seed": seed}
                        if spec.clean_rule != "balanced" and d.needs_clean_data:
                            key["clean_rule"] = spec.clean_rule  # (absent by default: ids of older studies hold)
                        tid = trial_id(key)
                        if tid in seen:  # the same trial reached from two sweeps (e.g. a default value)
                            continue
                        seen.add(tid)
                        trials.append(Trial(trial_id=tid, victim_index=vi, defense=d.name, config=config, axes=axes,
                                            clean_fraction=fraction, shots=shots, subset_seed=seed,
                                            clean_rule=spec.clean_rule))
    return trials


def _list(raw: Any, where: str, check, what: str) -> list:
    """A list whose every element passes `check`; absent (None) is []. An empty list written
    out is refused: it would silently mean "nothing" (or a default) where a value was meant."""
    if raw is None:
        return []
    if not isinstance(raw, list) or not raw:
        raise SpecError(f"{where}: must be a non-empty list (leave the key out instead), got {raw!r}")
    for i, v in enumerate(raw):
        if not check(v):
            raise SpecError(f"{where}[{i}]: must be {what}, got {v!r}")
    return raw


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_spec(raw: Any, source: str = "spec") -> StudySpec:
    """Validate a spec mapping; raise `SpecError` naming the first bad field."""
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a study spec is a mapping with keys {sorted(TOP_KEYS)}, got {type(raw).__name__}")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise SpecError(f"{unknown[0]}: unknown key in {source}; known: {sorted(TOP_KEYS)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise SpecError(f"name: a study needs a non-empty name, got {name!r}")

    raw_victims = raw["victims"] if raw.get("victims") is not None else [{}]   # left out: the default victim
    if not isinstance(raw_victims, list) or not raw_victims:
        raise SpecError(f"victims: must be a non-empty list of victim specs (leave the key out for the default "
                        f"digits BadNets victim), got {raw_victims!r}")
    victims, sources = [], []
    for i, v in enumerate(raw_victims):
        for where, spec in parse_victim_entry(v, f"victims[{i}]"):
            victims.append(spec)
            sources.append(where)

    raw_defenses = raw.get("defenses")
    if not isinstance(raw_defenses, list) or not raw_defenses:
        raise SpecError(f"defenses: must be a non-empty list, got {raw_defenses!r}")
    defenses = [_parse_defense(d, f"defenses[{i}]", len(victims)) for i, d in enumerate(raw_defenses)]

    clean = raw.get("clean") or {}
    clean_keys = {"fractions", "shots", "subset_seeds", "rule"}
    if not isinstance(clean, dict) or set(clean) - clean_keys:
        bad = sorted(set(clean) - clean_keys) if isinstance(clean, dict) else clean
        raise SpecError(f"clean: keys are fractions, shots, subset_seeds, rule; got {bad!r}")
    clean_rule = clean.get("rule", "balanced")
    if clean_rule not in CLEAN_RULES:
        raise SpecError(f"clean.rule: must be one of {list(CLEAN_RULES)} (balanced: class-balanced subsets; first: "
                        f"NFT's first-of-a-shuffle rule), got {clean_rule!r}")
    fractions = _list(clean.get("fractions"), "clean.fractions",
                      lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1,
                      "a share of the training set in (0, 1]")
    shots = _list(clean.get("shots"), "clean.shots", lambda v: _int(v) and v >= 1, "a positive integer")
    seeds = _list(clean.get("subset_seeds"), "clean.subset_seeds", lambda v: _int(v) and v >= 0,
                  "an integer >= 0") or [0]   # left out (or null): seed 0; an empty list is refused above
    if any(d.needs_clean_data for d in defenses) and not (fractions or shots):
        raise SpecError("clean: defences that need clean data are listed but no clean.fractions or clean.shots")

    resources = raw.get("resources") or {}
    if not isinstance(resources, dict) or set(resources) - {"cpu", "gpu"}:
        raise SpecError(f"resources: keys are cpu and gpu, got {resources!r}")
    cpu, gpu = resources.get("cpu", 1), resources.get("gpu", 0)
    if not (isinstance(cpu, (int, float)) and not isinstance(cpu, bool) and cpu > 0):
        raise SpecError(f"resources.cpu: must be > 0 (CPUs per trial), got {cpu!r}")
    if not (isinstance(gpu, (int, float)) and not isinstance(gpu, bool) and 0 <= gpu and (gpu <= 1 or gpu == int(gpu))):
        raise SpecError(f"resources.gpu: must be a share of one GPU in [0, 1] or a whole number, got {gpu!r}")
    tracking = raw.get("tracking") or {}
    if not isinstance(tracking, dict) or set(tracking) - {"experiment"}:
        raise SpecError(f"tracking: the only key is experiment, got {tracking!r}")
    max_concurrent = raw.get("max_concurrent")
    if max_concurrent is not None and not (_int(max_concurrent) and max_concurrent >= 1):
        raise SpecError(f"max_concurrent: must be a positive integer, got {max_concurrent!r}")
    failures = raw.get("failures") or {}
    if not isinstance(failures, dict) or set(failures) - {"max_retries"}:
        raise SpecError(f"failures: the only key is max_retries, got {failures!r}")
    max_retries = failures.get("max_retries", 2)
    if not (_int(max_retries) and max_retries >= 0):
        raise SpecError(f"failures.max_retries: must be an integer >= 0, got {max_retries!r}")
    pack = raw.get("pack", DEFAULT_PACK)
    if not (_int(pack) and pack >= 1):
        raise SpecError(f"pack: must be a positive integer (trials per pack; 1 = no packing), got {pack!r}")
    try:
        min_victim_asr = check_threshold(raw.get("min_victim_asr", MIN_VICTIM_ASR), "min_victim_asr")
    except ValueError as err:
        raise SpecError(str(err)) from err
    return StudySpec(name=name, victims=victims, defenses=defenses, fractions=fractions, shots=shots, pack=pack,
                     min_victim_asr=min_victim_asr,
                     subset_seeds=seeds, cpu=float(cpu), gpu=float(gpu), max_retries=max_retries, clean_rule=clean_rule,
                     experiment=tracking.get("experiment") or name, max_concurrent=max_concurrent,
                     description=str(raw.get("description", "")), raw=raw, victim_sources=sources)


def _parse_defense(d: Any, where: str, n_victims: int) -> DefenseSpec:
    if not isinstance(d, dict):
        raise SpecError(f"{where}: must be a mapping with name, config, sweep, victims; got {d!r}")
    unknown = sorted(set(d) - {"name", "config", "sweep", "victims"})
    if unknown:
        raise SpecError(f"{where}.{unknown[0]}: unknown key; a defence has name, config, sweep, victims")
    victims = d.get("victims")
    if victims is not None:
        _list(victims, f"{where}.victims", lambda v: _int(v) and 0 <= v < n_victims,
              f"an index into victims (0..{n_victims - 1})")
    name = d.get("name")
    if name not in DEFENSES:
        raise SpecError(f"{where}.name: unknown defence {name!r}; known: {sorted(DEFENSES)}")
    config = d.get("config") or {}
    sweep_raw = d.get("sweep") or {}
    if not isinstance(config, dict):
        raise SpecError(f"{where}.config: must be a mapping of config fields, got {config!r}")
    if not isinstance(sweep_raw, dict):
        raise SpecError(f"{where}.sweep: must be a mapping of axis -> values, got {sweep_raw!r}")
    fields = {f.name for f in dataclasses.fields(DEFENSES[name].Config)}
    for k in config:
        if k not in fields:
            raise SpecError(f"{where}.config.{k}: not a config field of {name}; fields: {sorted(fields)}")
    sweep, mapping = {}, {}
    for axis_name, axis_raw in sweep_raw.items():
        at = f"{where}.sweep.{axis_name}"
        try:
            mapping[axis_name] = config_field(name, axis_name, fields, at)
            sweep[axis_name] = parse_axis(axis_name, axis_raw, at)
        except ValueError as err:
            raise SpecError(str(err)) from err
        if mapping[axis_name] in config:
            raise SpecError(f"{at}: sets {mapping[axis_name]!r}, which {where}.config also fixes")
    spec = DefenseSpec(name, config, sweep, mapping, victims)
    # every grid point (and every range end, for Optuna) must be a valid config
    points = [dict(zip(sweep, vals)) for vals in itertools.product(*(a.grid() for a in sweep.values()))]
    ends = [{n: a.low if hi == 0 else a.high for n, a in sweep.items() if a.kind != "values"} for hi in (0, 1)]
    for axes in points + [e for e in ends if e]:
        try:
            build_defense(name, {**config, **{mapping[n]: v for n, v in axes.items()}})
        except (ValueError, TypeError) as err:
            swept = [n for n in axes if str(err).startswith(mapping[n] + ":")]
            at = f"{where}.sweep.{swept[0]}" if swept else f"{where}.config"
            raise SpecError(f"{at}: {err} (at {axes or 'the fixed config'})") from err
    return spec


def load_spec(preset: str | None = None, config: str | Path | None = None) -> StudySpec:
    """Read a preset by name (`study/presets/NAME.yaml`) or a YAML file, and validate it."""
    if preset is not None and config is not None:
        raise SpecError("--study-preset / --config: give one of them, not both")
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise SpecError(f"--config: {str(path)!r} does not exist")
    else:
        path = PRESETS / f"{preset or 'quick'}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in PRESETS.glob("*.yaml"))
            raise SpecError(f"--study-preset: unknown preset {preset!r}; known: {known}")
    return parse_spec(read_yaml(path, "--config" if config is not None else "--study-preset"), str(path))


def read_yaml(path: Path, flag: str) -> Any:
    """A YAML file's content; a file that is not UTF-8 text or not YAML is a `SpecError` naming
    `flag` and the file."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise SpecError(f"{flag}: {str(path)!r} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                        f"{err.start})") from err
    except yaml.YAMLError as err:
        raise SpecError(f"{flag}: {str(path)!r} is not valid YAML ({err})") from err
    except OSError as err:
        raise SpecError(f"{flag}: cannot read {str(path)!r} ({err.strerror or err})") from err


def output_dir(path: Path, flag: str = "--out") -> Path:
    """`path` as an output directory: refused, naming `flag`, when it or a folder above it is a file."""
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            where = "is" if p == path else f"is under {str(p)!r}, which is"
            raise SpecError(f"{flag}: {str(path)!r} {where} a file, not a directory")
    return path


def count_summary(spec: StudySpec, trials: list[Trial]) -> str:
    """One line per victim (what its attack is, where in the spec it comes from), then one per
    defence: how many trials and from which axes (for --dry-run and the log)."""
    sources = spec.victim_sources or [f"victims[{i}]" for i in range(len(spec.victims))]
    lines = [f"  victims ({len(spec.victims)}):"]
    for i, (v, where) in enumerate(zip(spec.victims, sources)):
        d = v.to_dict()
        if isinstance(v, ImportSpec):
            what = f"{v.attack}, stored poisoned test images" if not v.applies_trigger else attack_label(d)
            lines.append(f"    {i:2d} {where:22s} {v.source} {v.path} ({what}; sha256 {v.digest[:12]})")
            continue
        poison = (f"{d['poison_count']} poisoned" if d.get("poison_count") is not None
                  else f"poison rate {d['poison_rate']:g}")
        lines.append(f"    {i:2d} {where:22s} {attack_label(d)} {json.dumps(d['attack_params'], sort_keys=True)}, "
                     f"target {d['target']}, {poison}; {d['dataset']} {d['model']}")
    for d in spec.defenses:
        axes = " x ".join(f"{k} {len(a.grid())}" for k, a in d.sweep.items()) or "no sweep"
        budgets = len(spec.budgets(d))
        n_victims = len(spec.victims) if d.victims is None else len(d.victims)
        lines.append(f"  {d.name:5s} {n_victims} victim(s) x {axes} x {budgets} budget(s) "
                     f"x {len(spec.subset_seeds)} subset seed(s)")
    by_defense = {n: sum(t.defense == n for t in trials) for n in dict.fromkeys(d.name for d in spec.defenses)}
    lines.append("  trials per defence: " + ", ".join(f"{k} {v}" for k, v in by_defense.items())
                 + f"; total {len(trials)} (duplicates across sweeps counted once)")
    return "\n".join(lines)


__all__ = ["ATTACK_FIELDS", "DefenseSpec", "PRESETS", "SpecError", "StudySpec", "attack_label", "count_summary",
           "expand_trials", "load_spec", "parse_spec"]
