"""Reading a BackdoorBench (v2) `attack_result.pt` without running anything it holds.

The file is a `torch.save`d dict: `model_name`, `num_classes`, `model` (a state dict, keys
maybe prefixed `module.`), `data_path`, `img_size`, `clean_data` (the dataset's name),
`bd_train` and `bd_test`. Each of the last two (`bd_train` may be None) holds numpy arrays
`original_index_array` (the positions, in the clean dataset, of the images it keeps: for
`bd_test` the poisoned ones) and `poison_indicator` (1 where an image is poisoned), and a
`bd_data_container` whose `data_dict` maps a position to `{"path": PNG, "other_info":
[backdoor label, true label]}`. The clean images are not stored: they come from the clean
dataset, in torchvision's order.

Loading is `torch.load(weights_only=True)` with exactly the numpy globals such a file needs
allowed (`ALLOWED`). A file that needs any other global (BackdoorBench v1 and v2 results kept
in memory pickle PIL images; a crafted file pickles a callable) is refused before anything in
it is unpickled, with the globals it asks for named.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REQUIRED = ("model_name", "num_classes", "model", "data_path", "img_size", "clean_data", "bd_train", "bd_test")


def _numpy_globals() -> list:
    """numpy's array and scalar reconstruction, under both the numpy 1 and numpy 2 module names."""
    try:
        from numpy._core import multiarray as core   # numpy 2 (numpy.core is its deprecated alias)
    except ImportError:  # numpy 1
        from numpy.core import multiarray as core
    allowed = [np.ndarray, np.dtype]
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(core._reconstruct, f"{mod}._reconstruct"), (core.scalar, f"{mod}.scalar")]
    # numpy >= 1.25 may name a dtype's class (e.g. numpy.dtypes.Int64DType) when pickling it
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return allowed


def _global_name(g) -> str:
    if isinstance(g, tuple):
        return g[1]
    return f"{g.__module__}.{g.__qualname__}"


ALLOWED_NAMES = frozenset({_global_name(g) for g in _numpy_globals()} | {"numpy.dtype", "numpy.ndarray"})


def read_result(path: str | Path) -> dict:
    """The result file's dict, loaded safely; refused (ValueError naming the file) when it is not
    a v2 result this project can read without running code."""
    path = Path(path)
    where = f"backdoorbench: {str(path)!r}"
    serialization = torch.serialization
    if not hasattr(serialization, "safe_globals") or not hasattr(serialization, "get_unsafe_globals_in_checkpoint"):
        raise ValueError(f"{where}: reading BackdoorBench results safely needs torch >= 2.5 "
                         f"(this is {torch.__version__})")
    try:
        needed = set(serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception as err:  # not a torch zip file at all
        raise ValueError(f"{where} is not a file torch.save wrote ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200]})") from err
    foreign = sorted(needed - ALLOWED_NAMES)
    if foreign:
        if any(n.startswith("PIL.") for n in foreign):
            why = ("it pickles PIL images inside the file (BackdoorBench's v1 format, or a v2 result kept in memory); "
                   "unpickling them could run code. Re-save it with BackdoorBench v2, which writes the poisoned "
                   "images as PNG files")
        else:
            why = "unpickling them could run code, so it is never loaded"
        raise ValueError(f"{where} refused: it needs the Python globals {foreign}, which are not on the allowlist "
                         f"(numpy arrays only); {why}")
    try:
        with serialization.safe_globals(_numpy_globals()):
            result = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{where} refused: not loadable with weights_only=True ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200]})") from err
    if not isinstance(result, dict) or any(k not in result for k in REQUIRED):
        missing = [k for k in REQUIRED if not isinstance(result, dict) or k not in result]
        raise ValueError(f"{where} is not a BackdoorBench attack result (missing {missing})")
    bd_test = result["bd_test"]
    if not isinstance(bd_test, dict) or "bd_data_container" not in bd_test:
        raise ValueError(f"{where} refused: its bd_test is not BackdoorBench v2's (no bd_data_container); the v1 "
                         "format pickles its images inside the file and is not read")
    return result


@dataclass
class StoredPoison:
    """The poisoned images of one split as the result names them (paths not yet read)."""

    index: np.ndarray          # positions of their clean originals in the clean dataset
    paths: list[str]           # PNG paths as stored (relative to where BackdoorBench ran)
    labels: np.ndarray         # backdoor labels
    true_labels: np.ndarray    # the originals' labels


def stored_poison(split: dict, what: str) -> StoredPoison:
    """The poisoned images `split` (`bd_test` or `bd_train`) lists, in `original_index_array` order."""
    try:
        container = split["bd_data_container"]
        data = {int(k): v for k, v in container["data_dict"].items()}
        indicator = np.asarray(split["poison_indicator"]).astype(np.int64)
        kept = np.asarray(split["original_index_array"]).astype(np.int64)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{what}: not BackdoorBench v2's layout ({type(err).__name__}: {err})") from err
    index = np.array([i for i in kept if 0 <= i < len(indicator) and indicator[i] == 1], dtype=np.int64)
    paths, labels, true_labels = [], [], []
    for i in index:
        entry = data.get(int(i))
        if not isinstance(entry, dict) or "path" not in entry:
            raise ValueError(f"{what}: image {int(i)} is marked poisoned but has no stored file (data_dict[{int(i)}]"
                             f" is {type(entry).__name__})")
        info = list(entry.get("other_info") or [])
        if len(info) < 2:
            raise ValueError(f"{what}: data_dict[{int(i)}].other_info must be [backdoor label, true label], got {info}")
        paths.append(str(entry["path"]))
        labels.append(int(info[0]))
        true_labels.append(int(info[1]))
    return StoredPoison(index, paths, np.array(labels, dtype=np.int64), np.array(true_labels, dtype=np.int64))


def poisoned_train_index(split: dict | None, n_train: int) -> np.ndarray | None:
    """Positions of the poisoned training images (None: `bd_train` absent or not of this training set's size)."""
    if split is None:
        return None
    indicator = np.asarray(split.get("poison_indicator", [])).astype(np.int64)
    if len(indicator) != n_train:
        return None
    return np.nonzero(indicator == 1)[0]


def resolve_paths(paths: list[str], result_path: Path, bb_root: str | None) -> list[Path]:
    """Each stored PNG path as a file on this machine.

    A relative path is tried against `bb_root` (default: the result's folder and each folder above
    it), as written and with its leading `./` / `../` parts dropped, and finally as the part after
    the result's own folder name (a record folder moved elsewhere). The base found for the first
    file is used for all; the first missing file is named in the error."""
    result_dir = result_path.resolve().parent
    bases = [Path(bb_root)] if bb_root is not None else [result_dir, *result_dir.parents]

    def candidates(p: str):
        pp = Path(p)
        if pp.is_absolute():
            yield pp
            return
        parts = pp.parts
        stripped = Path(*[q for i, q in enumerate(parts) if not (q in (".", "..") and all(r in (".", "..")
                                                                                             for r in parts[:i + 1]))])
        for base in bases:
            yield base / pp
            yield base / stripped
        if result_dir.name in parts:  # the tail after the record folder's own name
            k = len(parts) - 1 - parts[::-1].index(result_dir.name)
            yield result_dir.joinpath(*parts[k + 1:])

    if not paths:
        return []
    first = next((c for c in candidates(paths[0]) if c.is_file()), None)
    if first is None:
        tried = ", ".join(str(c) for c in list(candidates(paths[0]))[:4])
        raise FileNotFoundError(f"bd_test: poisoned image {paths[0]!r} not found (tried {tried}, ...); give the "
                                f"folder BackdoorBench ran in as --bb-root")
    out = []
    for p in paths:
        found = next((c for c in candidates(p) if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"bd_test: poisoned image {p!r} not found (the first missing of {len(paths)}; "
                                    f"{paths[0]!r} was found as {str(first)!r})")
        out.append(found)
    return out
