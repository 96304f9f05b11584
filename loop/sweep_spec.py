"""Read a W&B sweep file (TOML or YAML) and validate it against the training config before any trial starts.

The file uses W&B's own keys (`method`, `metric`, `parameters`, `early_terminate`, `run_cap`), so the same
file drives an online W&B sweep and the local Optuna sweep. Parameter names are dotted config keys
(`training.learning_rate`) or the short names people write in sweep files (`learning_rate`, `epochs`, `lr`).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from loop.config import Config, all_keys, load_config
from loop.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

METHODS = ("grid", "random", "bayes")
# What loop/train.py logs at every eval, and the direction that makes each one better.
METRICS = {"eval/loss": "minimize", "eval/rouge_1": "maximize", "eval/rouge_2": "maximize",
           "eval/rouge_l": "maximize"}
# What loop/decode_search.py scores for each decoding setting (no loss: nothing is trained).
DECODE_METRICS = {"eval/rouge_1": "maximize", "eval/rouge_2": "maximize", "eval/rouge_l": "maximize",
                  "eval/rouge_mean": "maximize"}
# W&B distributions that Optuna samples the same way; the rest (normal, q_log_uniform, ...) have no equivalent.
DISTRIBUTIONS = ("constant", "categorical", "uniform", "q_uniform", "int_uniform", "log_uniform",
                 "log_uniform_values")
TOP_LEVEL = ("method", "metric", "parameters", "early_terminate", "run_cap", "name", "description")
PARAM_FIELDS = ("distribution", "values", "value", "min", "max", "q")
HYPERBAND_FIELDS = ("type", "min_iter", "max_iter", "s", "eta")
# Names from transformers.TrainingArguments and W&B examples that are not a config key's last part.
SHORT_NAMES = {
    "lr": "training.learning_rate", "epochs": "training.num_epochs", "num_train_epochs": "training.num_epochs",
    "per_device_train_batch_size": "training.batch_size", "train_batch_size": "training.batch_size",
}  # fmt: skip
# The sweep sets these for every trial (its run directory and its place in W&B).
RESERVED = ("training.output_dir", "wandb.group", "wandb.job_type")
# A grid bigger than this is a typo in a range, not a search anyone runs.
MAX_GRID_POINTS = 10_000


@dataclass(frozen=True)
class Param:
    """One swept hyperparameter: the name in the file, the config key it sets, and how to sample it."""

    name: str
    key: str
    distribution: str
    values: tuple[Any, ...] = ()  # categorical choices, or the one constant
    low: float | None = None  # bounds as values (log_uniform exponents are already exponentiated)
    high: float | None = None
    q: float | None = None
    integer: bool = False  # sample whole numbers (int_uniform, or q_uniform on an integer key)

    def grid_size(self) -> int | None:
        """How many values a grid search visits, without listing them; None for a continuous distribution."""
        if self.distribution in ("categorical", "constant"):
            return len(self.values)
        if self.distribution == "int_uniform":
            return int(self.high) - int(self.low) + 1
        if self.distribution == "q_uniform":
            return math.floor((self.high - self.low) / self.q + 1e-9) + 1
        return None

    def grid_values(self) -> list[Any] | None:
        """Every value a grid search visits, or None for a continuous distribution."""
        if self.distribution in ("categorical", "constant"):
            return list(self.values)
        if self.distribution == "int_uniform":
            return list(range(int(self.low), int(self.high) + 1))
        if self.distribution == "q_uniform":
            n = math.floor((self.high - self.low) / self.q + 1e-9)
            points = [self.low + i * self.q for i in range(n + 1)]
            return [int(v) for v in points] if self.integer else [round(v, 12) for v in points]
        return None


@dataclass(frozen=True)
class Hyperband:
    """W&B hyperband early termination: brackets at min_iter * eta**k evaluations."""

    min_iter: int
    eta: int


@dataclass
class SweepSpec:
    """A validated sweep file."""

    path: Path
    method: str
    metric: str
    goal: str
    params: list[Param]
    hyperband: Hyperband | None = None
    run_cap: int | None = None
    name: str = ""
    description: str = ""

    @property
    def metric_key(self) -> str:
        """The metric's key in eval_metrics.jsonl, e.g. `rouge_l`."""
        return self.metric.split("/", 1)[1]

    @property
    def searched(self) -> list[Param]:
        """The parameters that vary between trials (constants left out)."""
        return [p for p in self.params if p.distribution != "constant"]

    @property
    def constants(self) -> dict[str, Any]:
        """Config key -> value for the parameters fixed with `value`."""
        return {p.key: p.values[0] for p in self.params if p.distribution == "constant"}

    def grid(self) -> list[dict[str, Any]]:
        """Every point of a grid search, config key -> value."""
        space = {p.key: p.grid_values() for p in sorted(self.searched, key=lambda p: p.key)}
        return [dict(zip(space, combo, strict=True)) for combo in itertools.product(*space.values())]

    def fingerprint(self) -> str:
        """Hash of what makes trials comparable (run_cap, name and description may change on resume)."""
        data = {"method": self.method, "metric": self.metric, "goal": self.goal,
                "params": [dataclasses.asdict(p) for p in self.params],
                "hyperband": dataclasses.asdict(self.hyperband) if self.hyperband else None}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def to_wandb(self) -> dict[str, Any]:
        """The sweep as the dict `wandb.sweep` takes, with the values as validated here."""
        params: dict[str, Any] = {}
        for p in self.params:
            if p.distribution == "constant":
                params[p.name] = {"value": p.values[0]}
            elif p.distribution == "categorical":
                params[p.name] = {"values": list(p.values)}
            else:
                # log_uniform bounds were exponentiated on reading: hand W&B the values form.
                dist = "log_uniform_values" if p.distribution == "log_uniform" else p.distribution
                params[p.name] = {"distribution": dist, "min": p.low, "max": p.high}
                if p.q is not None:
                    params[p.name]["q"] = p.q
        out: dict[str, Any] = {"method": self.method, "metric": {"name": self.metric, "goal": self.goal},
                               "parameters": params}
        if self.hyperband:
            out["early_terminate"] = {"type": "hyperband", "min_iter": self.hyperband.min_iter,
                                      "eta": self.hyperband.eta}
        if self.run_cap:
            out["run_cap"] = self.run_cap
        out.update({k: v for k, v in (("name", self.name), ("description", self.description)) if v})
        return out


def override(key: str, value: Any) -> str:
    """A `--set key=value` item that loop.config reads back as `value`."""
    if isinstance(value, str):
        return f"{key}={value}"  # string keys take the raw text
    return f"{key}={tomli_w.dumps({'v': value})[4:].strip()}"


def load_sweep(path: str | Path, config: str | Path | None = None, overrides: tuple[str, ...] = (),
               metrics: Mapping[str, str] = METRICS, section: str = "",
               logged_by: str = "loop/train.py logs at each eval") -> SweepSpec:
    """Parse and validate a sweep file; every value is checked against the config it will override.

    `metrics` are the names the file may rank by (and their goals), `logged_by` says who logs them; a non-empty
    `section` (e.g. "generation") refuses any parameter outside that config section.
    """
    path = Path(path)
    data = _read(path)
    where = str(path)

    def bad(key: str, message: str) -> UserError:
        return UserError(f"{where}: `{key}` {message}")

    for key in data:
        if key not in TOP_LEVEL:
            raise bad(key, f"is not a sweep key{_did_you_mean(key, TOP_LEVEL)} (valid: {', '.join(TOP_LEVEL)})")
    for key in ("name", "description"):
        if not isinstance(data.get(key, ""), str):
            raise bad(key, f"must be a string, got {data[key]!r}")
    method = data.get("method")
    if method is None:
        raise UserError(f"{where}: `method` is missing (one of {', '.join(METHODS)})")
    if method not in METHODS:
        raise bad("method", f"must be one of {', '.join(METHODS)}, got {method!r}{_did_you_mean(method, METHODS)}")
    metric, goal = _metric(data.get("metric"), bad, where, metrics, logged_by)
    params = _params(data.get("parameters"), where, config, overrides, section)
    if method == "grid":
        points = 1
        for p in params:
            if p.grid_size() is None:
                raise bad(f"parameters.{p.name}", f"uses `{p.distribution}`, which a grid cannot enumerate; "
                          "give `values`, or use int_uniform / q_uniform")
            points *= p.grid_size()
        if points > MAX_GRID_POINTS:  # counted, not listed: a wide int_uniform would take all memory
            raise UserError(f"{where}: the grid has {points:,} points (at most {MAX_GRID_POINTS:,}); "
                            "narrow the ranges or use random or bayes")
    run_cap = data.get("run_cap")
    if run_cap is not None and (not isinstance(run_cap, int) or isinstance(run_cap, bool) or run_cap < 1):
        raise bad("run_cap", f"must be a whole number ≥ 1, got {run_cap!r}")
    return SweepSpec(path=path, method=method, metric=metric, goal=goal, params=params,
                     hyperband=_hyperband(data.get("early_terminate"), bad), run_cap=run_cap,
                     name=str(data.get("name", "")), description=str(data.get("description", "")))


def _read(path: Path) -> dict[str, Any]:
    """The sweep file as a dict: TOML by default, YAML for .yaml/.yml."""
    if path.is_dir():
        raise UserError(f"{path}: is a directory; pass the sweep file (.toml, .yaml or .yml)")
    if not path.is_file():
        raise UserError(f"sweep file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line}: byte 0x{raw[err.start]:02x} is not valid UTF-8 (save the file as "
                        "UTF-8)") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise UserError(f"{path}: invalid YAML: {' '.join(str(err).split())}") from None
    elif path.suffix.lower() == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise UserError(f"{path}: invalid TOML: {err}") from None
    else:
        raise UserError(f"{path}: a sweep file must end in .toml, .yaml or .yml")
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a table of sweep keys (method, metric, parameters), got {data!r}")
    return data


def _metric(metric: Any, bad: Any, where: str, metrics: Mapping[str, str], logged_by: str) -> tuple[str, str]:
    """(name, goal) after checking that the metric is logged and the goal makes it better."""
    if not isinstance(metric, dict) or "name" not in metric:
        raise UserError(f"{where}: `metric` must be a table with `name` and `goal`, e.g. "
                        "metric = {name = \"eval/rouge_l\", goal = \"maximize\"}")
    for key in metric:
        if key not in ("name", "goal"):
            raise bad(f"metric.{key}", "is not supported (valid: name, goal)")
    name = metric["name"]
    if not isinstance(name, str) or name not in metrics:
        raise bad("metric.name", f"must be a metric {logged_by} ({', '.join(metrics)}), "
                  f"got {name!r}{_did_you_mean(str(name), metrics)}")
    goal = metric.get("goal", "minimize")  # W&B's default
    if goal not in ("minimize", "maximize"):
        raise bad("metric.goal", f"must be \"minimize\" or \"maximize\", got {goal!r}")
    if goal != metrics[name]:
        default = " (W&B minimizes when goal is missing)" if "goal" not in metric else ""
        raise bad("metric.goal", f"is {goal!r}{default}, but {name} is better when it is "
                  f"{'higher' if metrics[name] == 'maximize' else 'lower'}: set goal = \"{metrics[name]}\"")
    return name, goal


def _params(raw: Any, where: str, config: str | Path | None, overrides: tuple[str, ...],
            section: str = "") -> list[Param]:
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{where}: `parameters` must be a table with at least one parameter")
    params: list[Param] = []
    seen: dict[str, str] = {}
    for name, entry in raw.items():
        label = f"parameters.{name}"
        if not isinstance(name, str):  # YAML reads `1:` as a number
            raise UserError(f"{where}: `{label}`: a parameter name must be a config key, got {name!r}")
        if not isinstance(entry, dict):
            raise UserError(f"{where}: `{label}` must be a table like {{values = [...]}}, got {entry!r}")
        if not set(entry) & set(PARAM_FIELDS):
            raise UserError(f"{where}: `{label}` has no values/value/distribution; to name a config key in TOML "
                            f"quote it ([parameters.\"training.learning_rate\"]) or use a short name (learning_rate)")
        key = config_key(name, where)
        if section and not key.startswith(f"{section}."):
            raise UserError(f"{where}: `{label}` sets `{key}`, but this search changes only {section}.* keys")
        if key in seen:
            raise UserError(f"{where}: `{label}` and `parameters.{seen[key]}` both set `{key}`")
        seen[key] = name
        if key in RESERVED:
            raise UserError(f"{where}: `{label}` sets `{key}`, which the sweep sets for every trial")
        params.append(_param(name, key, entry, f"{where}: `{label}`", config, overrides))
    return params


def config_key(name: str, where: str) -> str:
    """The dotted config key a sweep parameter name means."""
    keys = all_keys()
    if name in keys:
        return name
    if name in SHORT_NAMES:
        return SHORT_NAMES[name]
    by_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == name]
    if len(by_leaf) == 1:
        return by_leaf[0]
    close = difflib.get_close_matches(name, keys, n=1, cutoff=0.6)
    if not close:
        leaf = difflib.get_close_matches(name, [k.rsplit(".", 1)[-1] for k in keys], n=1, cutoff=0.6)
        close = [k for k in keys if leaf and k.rsplit(".", 1)[-1] == leaf[0]]
    hint = f"; did you mean `{close[0]}`?" if close else " (see loop.config.all_keys())"
    raise UserError(f"{where}: `parameters.{name}` is not a config key{hint}")


def _param(name: str, key: str, entry: dict[str, Any], where: str, config: str | Path | None,
           overrides: tuple[str, ...]) -> Param:
    for field_name in entry:
        if field_name not in PARAM_FIELDS:
            raise UserError(f"{where}: unknown field `{field_name}`{_did_you_mean(field_name, PARAM_FIELDS)} "
                            f"(valid: {', '.join(PARAM_FIELDS)})")
    dist = entry.get("distribution") or _inferred(entry)
    if dist not in DISTRIBUTIONS:
        raise UserError(f"{where}: distribution {dist!r} is not supported (supported: {', '.join(DISTRIBUTIONS)})")
    default = _default(key)
    integer_key = isinstance(default, int) and not isinstance(default, bool)

    def typed(value: Any, what: str) -> Any:
        """The value as the config will hold it; the config's own checks reject it here, not in a trial."""
        try:
            cfg = load_config(config, [*overrides, override(key, value)])
        except UserError as err:
            raise UserError(f"{where}: {what} {value!r} is rejected by the config: {err}") from None
        return _get(cfg, key)

    if dist == "constant":
        if "value" not in entry:
            raise UserError(f"{where}: a constant needs `value`")
        return Param(name, key, dist, values=(typed(entry["value"], "value"),))
    if dist == "categorical":
        values = entry.get("values")
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}: `values` must be a non-empty list, got {values!r}")
        if any(isinstance(v, (list, dict)) for v in values):
            raise UserError(f"{where}: `values` must be numbers, strings or booleans")
        return Param(name, key, dist, values=tuple(typed(v, "value") for v in values))
    if not (integer_key or isinstance(default, float)):
        raise UserError(f"{where}: `{key}` is not a number: give `values` instead of a {dist} distribution")
    low, high = (_number(entry.get(b), b, where) for b in ("min", "max"))
    if low >= high:
        raise UserError(f"{where}: `min` ({low}) must be less than `max` ({high})")
    q = _number(entry.get("q", 1), "q", where) if dist == "q_uniform" else None
    if q is not None and q <= 0:
        raise UserError(f"{where}: `q` must be > 0, got {q}")
    if dist == "log_uniform_values" and low <= 0:
        raise UserError(f"{where}: log_uniform_values needs `min` > 0, got {low} (log_uniform takes exponents)")
    if dist == "log_uniform":  # W&B's log_uniform bounds are natural-log exponents
        low, high = math.exp(low), math.exp(high)
    integer = dist == "int_uniform" or (dist == "q_uniform" and integer_key)
    if integer and not all(float(v).is_integer() for v in (low, high, q or 1)):
        raise UserError(f"{where}: {dist} on `{key}` needs whole numbers for min, max and q, "
                        f"got min {low}, max {high}" + (f", q {q}" if q is not None else ""))
    if integer_key and not integer:
        raise UserError(f"{where}: `{key}` is an integer but {dist} samples fractions: use int_uniform or values")
    if integer:
        low, high, q = int(low), int(high), (int(q) if q is not None else None)
    return Param(name, key, dist, low=typed(low, "min"), high=typed(high, "max"), q=q, integer=integer)


def _inferred(entry: dict[str, Any]) -> str:
    """W&B's rule for a parameter without `distribution`."""
    if "values" in entry:
        return "categorical"
    if "value" in entry:
        return "constant"
    bounds = (entry.get("min"), entry.get("max"))
    whole = all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)
    return "int_uniform" if whole else "uniform"


def _number(value: Any, name: str, where: str) -> float:
    # PyYAML reads `1e-5` (no dot) as a string; W&B users write it that way all the time.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if value is None:
        raise UserError(f"{where}: `{name}` is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{where}: `{name}` must be a number, got {value!r}")
    return value


def _default(key: str) -> Any:
    return _get(Config(), key)


def _get(cfg: Config, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _hyperband(raw: Any, bad: Any) -> Hyperband | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or raw.get("type") != "hyperband":
        raise bad("early_terminate", "must be a table with type = \"hyperband\" (the only type W&B has)")
    for key in raw:
        if key not in HYPERBAND_FIELDS:
            raise bad(f"early_terminate.{key}", f"is not supported (valid: {', '.join(HYPERBAND_FIELDS)})")
    for key in ("min_iter", "max_iter", "s", "eta"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise bad(f"early_terminate.{key}", f"must be a whole number ≥ 1, got {value!r}")
    eta = raw.get("eta", 3)
    if eta < 2:
        raise bad("early_terminate.eta", f"must be ≥ 2 (the factor between brackets), got {eta}")
    if "min_iter" in raw:
        return Hyperband(raw["min_iter"], eta)
    if "max_iter" in raw and "s" in raw:
        # W&B places s brackets below max_iter, each eta times smaller: the first is at max_iter / eta**s.
        return Hyperband(max(1, raw["max_iter"] // eta ** raw["s"]), eta)
    raise bad("early_terminate", "needs `min_iter` (or `max_iter` with `s`)")


def _did_you_mean(word: Any, options: Any) -> str:
    # str(): YAML gives numbers and lists where a name belongs.
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""
