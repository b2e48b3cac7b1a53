"""A victim whose backdoor did not take: never to be read as a defence's success.

Several attacks at their default parameters implant little or nothing in some settings (on the
built-in digits, SIG, WaNet, Trojan, LC and BPP reach an ASR of 0-31% before any defence). A
defence run on such a victim leaves a low ASR that says nothing about the defence, so every
command warns when a victim's ASR before any defence is below `MIN_VICTIM_ASR` (a setting:
the spec's `min_victim_asr`, `--min-victim-asr`), and the analysis labels its trials
`no backdoor` and leaves them out of the fits, measures and ranking.
"""
from __future__ import annotations

MIN_VICTIM_ASR = 80.0   # percent: below it, a victim's backdoor counts as not implanted

# what usually strengthens each attack (the working sets on the digits in study/presets/attacks-digits.yaml)
STRENGTHEN = {
    "badnets": "a larger attack_params.trigger_size, alpha 1.0, or a higher poison_rate",
    "blend": "a higher attack_params.alpha (e.g. 0.2 -> 0.3) or poison_rate",
    "sig": "a larger attack_params.delta (e.g. 0.3) with rate_of: training_set and poison_rate 0.08",
    "wanet": "a larger attack_params.strength (e.g. 4.0) or more epochs",
    "trojan": "a larger attack_params.trigger_size (e.g. 4) and position: center",
    "lc": "larger attack_params.eps (e.g. 0.3), pgd_steps (20), corners (4) and trigger_size (5), "
          "with rate_of: training_set",
    "bpp": "fewer attack_params.bits (e.g. 2)",
}


def weak_backdoor(attack: str, attack_params: dict | None, asr: float | None,
                  threshold: float = MIN_VICTIM_ASR) -> str | None:
    """The warning for a victim of `attack` whose ASR (%, before any defence) is below
    `threshold`, naming what usually strengthens the attack; None when the backdoor took (or
    the ASR is unknown)."""
    if asr is None or asr != asr or asr >= threshold:
        return None
    hint = STRENGTHEN.get(attack, "a stronger trigger, a higher poison_rate or more epochs")
    params = "its defaults" if not attack_params else ", ".join(f"{k}={v}" for k, v in sorted(attack_params.items()))
    return (f"warning: the {attack} victim ({params}) has ASR {asr:.1f}% before any defence, below "
            f"min_victim_asr {threshold:g}%: its backdoor did not take, so a defence's low ASR on it means nothing "
            f"(the analysis labels its trials 'no backdoor'). What usually strengthens {attack}: {hint}")


def victim_warning(victim: dict, metrics: dict, threshold: float = MIN_VICTIM_ASR) -> str | None:
    """`weak_backdoor` for a victim's spec dict (a `VictimSpec` or `ImportSpec` as a dict) and
    its measured metrics; never for a clean model (nothing poisoned)."""
    if not victim.get("poison_rate") and not victim.get("poison_count") and "source" not in victim:
        return None
    return weak_backdoor(victim.get("attack", "?"), victim.get("attack_params"), metrics.get("asr"), threshold)


def check_threshold(value: float, where: str) -> float:
    """`value` as a min_victim_asr, or a ValueError naming `where`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
        raise ValueError(f"{where}: must be an ASR in percent, in [0, 100], got {value!r}")
    return float(value)


__all__ = ["MIN_VICTIM_ASR", "STRENGTHEN", "check_threshold", "victim_warning", "weak_backdoor"]
