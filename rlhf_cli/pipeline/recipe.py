"""A recipe: one YAML file that describes a whole run, read and checked before anything runs (torch-free).

    # rlhf pipeline examples/recipes/demo.yaml
    run: runs/demo
    model: HuggingFaceTB/SmolLM2-135M-Instruct
    sft: {data: examples/data/sft_messages.jsonl, max_length: 512}
    reward: {data: examples/data/prefs_ranked.jsonl, freeze_layers: 20}
    stage3: {algo: ppo, prompts: examples/data/prompts.jsonl, max_steps: 20}
    eval: {prompts: examples/data/prompts.jsonl, max_samples: 16, prefs: examples/data/prefs_explicit.jsonl}
    # eval may also name other judges of the policies: judges: [runs/other/reward]

Each stage section holds exactly what that stage's own `--config` file would (the same keys, types, bounds and
rules, checked by the same code), less the keys the pipeline sets itself (where a stage reads and writes). Later
rounds (`rounds: N`) add `rounds_prompts`, `generate` (the `rlhf generate` settings for the answers to rank),
`auto_label` and `reward_init`. Paths are read relative to the folder the command runs in, as `--config` files are.

Stage 3 goes through one table, `ALGOS`: each algorithm names its stage (folder), its args class and run function
by module path (imported only when used, so an algorithm whose module is not in this version is one clear error),
the keys the pipeline fills in, and the data it needs.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_cli.core.args import DEFAULT_MODEL
from rlhf_cli.core.config import load_yaml, mapping_values, near_key, validate
from rlhf_cli.core.errors import ConfigError
from rlhf_cli.data.io import FILE_SUFFIXES


@dataclass(frozen=True)
class Algo:
    """One stage-3 algorithm: where its code lives and how the pipeline wires it to the previous stages."""

    stage: str  # the stage (manifest `stage`, folder name) it writes
    args: str  # "module:Class", torch-free
    run: str  # "module:function", imported when the stage runs
    policy_key: str  # the field that takes the policy to start from
    reward_key: str | None  # the field that takes the reward model (None: the algorithm uses none)
    needs: str  # the section key that must be given: prompts, or preference data
    fixed: tuple[tuple[str, Any], ...] = ()  # fields the table sets (the PPO family's `algo`)
    check: str | None = None  # "module:function" with the rules between fields, if the stage has one

    @property
    def owned(self) -> tuple[str, ...]:
        return tuple(k for k in (self.policy_key, self.reward_key, "out", "run", "overwrite", "resume") if k) \
            + tuple(k for k, _ in self.fixed)


_PPO_FAMILY = dict(stage="ppo", args="rlhf_cli.stages.ppo.args:PPOArgs", run="rlhf_cli.stages.ppo.train:run_ppo",
                   policy_key="policy", reward_key="reward", needs="prompts",
                   check="rlhf_cli.stages.ppo.args:check_ppo_args")
ALGOS: dict[str, Algo] = {
    "ppo": Algo(**_PPO_FAMILY, fixed=(("algo", "ppo"),)),
    "grpo": Algo(**_PPO_FAMILY, fixed=(("algo", "grpo"),)),
    "rloo": Algo(**_PPO_FAMILY, fixed=(("algo", "rloo"),)),
    "best-of-n": Algo("best-of-n", "rlhf_cli.stages.best_of_n.args:BestOfNArgs",
                      "rlhf_cli.stages.best_of_n.train:run_best_of_n", "policy", "reward", "prompts"),
    "dpo": Algo("dpo", "rlhf_cli.stages.dpo.args:DPOArgs", "rlhf_cli.stages.dpo.train:run_dpo", "model", None,
                "data"),
}

TOP_KEYS = ("run", "model", "rounds", "rounds_prompts", "auto_label", "reward_init", "sft", "reward", "stage3",
            "generate", "eval")
REWARD_INIT = ("sft", "previous")
# Keys of a section that the pipeline sets: where each stage reads from and writes to.
OWNED = {"sft": ("model", "out", "run", "overwrite", "resume"),
         "reward": ("out", "run", "overwrite", "resume"),
         "generate": ("model", "prompts", "out", "overwrite"),
         "eval": ("model", "baseline", "run", "save")}
EVAL_EXTRA = ("prefs",)  # eval keys of the pipeline's own: held-out preferences for `rlhf eval reward`


def load_class(path: str) -> Any:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def available(algo: Algo) -> bool:
    """Whether this version holds the algorithm's code (found without importing it)."""
    try:
        return all(importlib.util.find_spec(p.split(":")[0]) is not None for p in (algo.args, algo.run))
    except ModuleNotFoundError:
        return False


@dataclass
class Recipe:
    """A checked recipe. The `*_values` dicts hold each section's settings (coerced, without the keys the
    pipeline sets); `Pipeline` builds each stage's args from them."""

    path: Path
    run: Path
    model: str
    algo_name: str
    sft_values: dict[str, Any]
    reward_values: dict[str, Any]
    stage3_values: dict[str, Any]
    eval_values: dict[str, Any]
    eval_prefs: str | None
    generate_values: dict[str, Any]
    rounds: int = 1
    round_prompts: list[str] = field(default_factory=list)  # for rounds 2..N, one entry each
    split_prompts: str | None = None  # one file cut into rounds-1 disjoint chunks
    auto_label: str | None = None
    reward_init: str = "sft"

    @property
    def algo(self) -> Algo:
        return ALGOS[self.algo_name]

    def stage3_prompts(self) -> str | None:
        return self.stage3_values.get("prompts")


class _Where:
    """`FILE:LINE: section: key 'x'` for errors, the line found in the YAML's node tree."""

    def __init__(self, path: Path):
        self.path, self.lines = path, {}
        try:
            import yaml

            root = yaml.compose(path.read_text(encoding="utf-8-sig"))
        except Exception:
            return
        if root is None or not hasattr(root, "value") or not isinstance(root.value, list):
            return
        for k, v in root.value:
            if not hasattr(k, "value"):
                continue
            self.lines[(str(k.value),)] = k.start_mark.line + 1
            if isinstance(getattr(v, "value", None), list):
                for item in v.value:
                    if isinstance(item, tuple) and hasattr(item[0], "value"):
                        self.lines[(str(k.value), str(item[0].value))] = item[0].start_mark.line + 1

    def __call__(self, section: str | None, key: str | None = None) -> str:
        line = self.lines.get((section, key) if key else (section,)) if section else None
        if line is None and section:
            line = self.lines.get((section,))
        where = f"{self.path}:{line}" if line else str(self.path)
        if section and key:
            return f"{where}: {section}: key {key!r}"
        return f"{where}: {section}" if section else where


def _section(raw: dict, name: str, where: _Where, required: bool) -> dict[str, Any]:
    value = raw.get(name)
    if value is None:
        if required:
            raise ConfigError(f"{where(None)}: section {name!r} missing; expected `{name}:` with that stage's "
                              f"settings (the keys its --config file takes)")
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where(name)}: expected a mapping of setting: value (the keys of that stage's "
                          f"--config file), found {type(value).__name__}")
    return {str(k).replace("-", "_"): v for k, v in value.items()}


def _refuse_owned(values: dict, owned: tuple[str, ...], section: str, where: _Where, why: str) -> None:
    for k in owned:
        if k in values:
            raise ConfigError(f"{where(section, k)}: set by the pipeline ({why}); remove it from the recipe")


def _check_args(cls: type, values: dict[str, Any], fixed: dict[str, Any], section: str, where: _Where,
                check: Any = None) -> Any:
    """The section through the stage's own schema: known keys and types (`mapping_values`), then the field
    bounds and the rules between fields, as its --config is checked."""
    coerced = mapping_values(cls, values, f"{where(section)}")
    try:
        args = cls(**(coerced | fixed))
        (check or validate)(args)
    except ConfigError as e:
        key = re.match(r"^--([a-z0-9-]+)", str(e))
        if key is None:
            raise ConfigError(f"{where(section)}: {e}") from None
        rest = str(e)[key.end():].lstrip(": ")
        raise ConfigError(f"{where(section, key.group(1).replace('-', '_'))}: {rest}") from None
    return coerced


def _local_path_missing(spec: Any) -> bool:
    """A path that looks like a local file (or says it is one) and is not there; hub names are left to the stage."""
    if not isinstance(spec, str):
        return False
    p = Path(spec).expanduser()
    if p.exists():
        return False
    return p.suffix in FILE_SUFFIXES or spec.startswith((".", "/", "~"))


def _require_file(spec: Any, section: str, key: str, where: _Where, what: str) -> None:
    if _local_path_missing(spec):
        raise ConfigError(f"{where(section, key)}: {spec}: no such file; expected {what}")


def load_recipe(path: str | Path, run: str | None = None) -> Recipe:
    """Read and check the whole recipe; the first problem is one ConfigError naming the file, section and key.
    `run` replaces the recipe's run folder."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"RECIPE {path}: no such file; expected a recipe YAML, such as examples/recipes/demo.yaml")
    try:
        raw = load_yaml(p)
    except ConfigError as e:
        raise ConfigError(str(e).replace("--config ", "RECIPE ")) from None
    where = _Where(p)
    for key in raw:
        if str(key) not in TOP_KEYS:
            raise ConfigError(f"{where(str(key))}: unknown key {key!r}; expected one of: {', '.join(TOP_KEYS)}"
                              + near_key(str(key), TOP_KEYS))
    if run is not None:
        raw["run"] = run
    if not raw.get("run"):
        raise ConfigError(f"{where(None)}: `run:` missing; expected the run folder, such as `run: runs/demo`")
    model = str(raw.get("model") or DEFAULT_MODEL)

    from rlhf_cli.evaluation.args import EvalPolicyArgs
    from rlhf_cli.interact.args import GenerateArgs
    from rlhf_cli.stages.reward.args import RewardArgs
    from rlhf_cli.stages.sft.args import SFTArgs

    # sft
    sft = _section(raw, "sft", where, True)
    if "model" in sft:  # as in an `rlhf sft --config` file; one model only, said once
        if raw.get("model") is not None and str(sft["model"]) != model:
            raise ConfigError(f"{where('sft', 'model')}: {sft['model']} differs from the recipe's top-level "
                              f"`model: {model}`; give the model to start from once, at the top")
        model = str(sft.pop("model"))
    _refuse_owned(sft, OWNED["sft"], "sft", where, "it writes RUN/sft")
    sft = _check_args(SFTArgs, sft, {"model": model}, "sft", where, load_class("rlhf_cli.core.args:check_train_args"))
    for k in ("data", "eval_data"):
        _require_file(sft.get(k), "sft", k, where, "demonstrations (a .jsonl/.json/.csv/.parquet file, a folder or "
                                                   "a hub dataset)")

    # reward
    reward = _section(raw, "reward", where, True)
    _refuse_owned(reward, OWNED["reward"], "reward", where, "it writes RUN/reward, and RUN/roundK/reward later")
    reward = _check_args(RewardArgs, reward, {}, "reward", where, load_class("rlhf_cli.core.args:check_train_args"))
    for k in ("data", "eval_data"):
        _require_file(reward.get(k), "reward", k, where, "preferences (a .jsonl/.json/.csv/.parquet file, a folder "
                                                         "or a hub dataset)")

    # stage 3: one table of algorithms
    stage3 = _section(raw, "stage3", where, True)
    algo_name = str(stage3.pop("algo", "ppo"))
    if algo_name not in ALGOS:
        raise ConfigError(f"{where('stage3', 'algo')}: {algo_name!r} is not one of: {', '.join(ALGOS)}"
                          + near_key(algo_name, ALGOS))
    algo = ALGOS[algo_name]
    if not available(algo):
        raise ConfigError(f"{where('stage3', 'algo')}: algo {algo_name} is not available in this version (no "
                          f"module {algo.run.split(':')[0]}); choose one of: "
                          f"{', '.join(a for a, x in ALGOS.items() if available(x))}")
    _refuse_owned(stage3, algo.owned, "stage3", where, "it chains the previous stages' folders")
    fixed = dict(algo.fixed)
    stage3 = _check_args(load_class(algo.args), stage3, fixed, "stage3", where,
                         load_class(algo.check) if algo.check else None)
    if not stage3.get(algo.needs):
        what = "prompts to sample on" if algo.needs == "prompts" else "preference data (pairs or ranked lists)"
        raise ConfigError(f"{where('stage3', algo.needs)}: missing; algo {algo_name} needs {what}: add "
                          f"`{algo.needs}: FILE` to stage3")
    _require_file(stage3.get(algo.needs), "stage3", algo.needs, where, "a data file, a folder or a hub dataset")

    # eval
    ev = _section(raw, "eval", where, False)
    _refuse_owned(ev, OWNED["eval"], "eval", where, "it compares each round's policy with the sft stage and the "
                                                    "previous round")
    prefs = ev.pop("prefs", None)
    ev.setdefault("prompts", stage3.get("prompts"))
    if not ev.get("prompts"):
        raise ConfigError(f"{where('eval', 'prompts')}: missing; expected prompts to compare the policies on")
    ev = _check_args(EvalPolicyArgs, ev, {}, "eval", where)
    _require_file(ev.get("prompts"), "eval", "prompts", where, "a prompt file (or any SFT or preference file)")
    _require_file(prefs, "eval", "prefs", where, "held-out preferences for `rlhf eval reward`")
    _require_file(ev.get("reward"), "eval", "reward", where, "a reward model folder")
    if isinstance(ev.get("judges"), str):  # one other judge, given without the list brackets
        ev["judges"] = [ev["judges"]]
    if ev.get("judges") is not None and not all(isinstance(j, str) and j for j in ev["judges"]):
        raise ConfigError(f"{where('eval', 'judges')}: {ev['judges']!r}: expected a list of reward model folders, "
                          f"such as `judges: [runs/other/reward]`")
    for judge in ev.get("judges") or []:
        _require_file(judge, "eval", "judges", where, "a reward model folder to judge the policies too")

    # rounds
    rounds = raw.get("rounds", 1)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"{where('rounds')}: {rounds!r}: expected a whole number >= 1")
    reward_init = str(raw.get("reward_init", "sft"))
    if reward_init not in REWARD_INIT:
        raise ConfigError(f"{where('reward_init')}: {reward_init!r} is not one of: {', '.join(REWARD_INIT)}")
    gen = raw.get("generate") or {}
    if not isinstance(gen, dict):
        raise ConfigError(f"{where('generate')}: expected a mapping of `rlhf generate` settings")
    gen = {str(k).replace("-", "_"): v for k, v in gen.items()}
    _refuse_owned(gen, OWNED["generate"], "generate", where, "it samples the current policy on the round's prompts")
    gen = _check_args(GenerateArgs, gen, {}, "generate", where)
    run = Path(str(raw["run"]))
    recipe = Recipe(p, run, model, algo_name, sft, reward, stage3, ev, prefs, gen, rounds,
                    reward_init=reward_init)
    _check_rounds(recipe, raw, where)
    return recipe


def _check_rounds(recipe: Recipe, raw: dict, where: _Where) -> None:
    extra = [k for k in ("rounds_prompts", "auto_label", "generate") if raw.get(k) is not None]
    if recipe.rounds == 1:
        if extra:
            raise ConfigError(f"{where(extra[0])}: only used with `rounds:` 2 or more (this recipe runs one round)")
        return
    if recipe.algo.reward_key is None:
        raise ConfigError(f"{where('rounds')}: later rounds train a new reward model for stage 3, and algo "
                          f"{recipe.algo_name} uses none; use rounds: 1, or an algorithm with a reward model")
    spec = raw.get("rounds_prompts")
    if spec is None:
        raise ConfigError(f"{where('rounds_prompts')}: missing; rounds 2..{recipe.rounds} sample new answers to rank "
                          f"on new prompts: a list of {recipe.rounds - 1} files, or one file cut into "
                          f"{recipe.rounds - 1} parts")
    if isinstance(spec, list):
        if len(spec) != recipe.rounds - 1:
            raise ConfigError(f"{where('rounds_prompts')}: {len(spec)} files for {recipe.rounds - 1} later rounds; "
                              f"expected one file per round 2..{recipe.rounds}, or one file to cut into parts")
        recipe.round_prompts = [str(s) for s in spec]
    else:
        recipe.split_prompts = str(spec)
    for s in recipe.round_prompts or [recipe.split_prompts]:
        _require_file(s, "rounds_prompts", None, where, "prompts for the later rounds")
    label = raw.get("auto_label")
    if label is not None:
        recipe.auto_label = str(label)
        first_rm = (recipe.run / "reward").resolve()
        if Path(recipe.auto_label).resolve() != first_rm and not Path(recipe.auto_label).is_dir():
            raise ConfigError(f"{where('auto_label')}: {label}: no such folder; expected a reward model folder (a "
                              f"reward stage) that ranks the sampled answers in place of people, or "
                              f"{recipe.run / 'reward'} (this run's round-1 reward model)")


def stage3_args(recipe: Recipe, policy: str, reward: str | None, out: Path, overwrite: bool, resume: bool) -> Any:
    """The stage-3 args object of one round."""
    algo = recipe.algo
    wired = {algo.policy_key: policy, "out": str(out), "run": None, "overwrite": overwrite, "resume": resume}
    if algo.reward_key:
        wired[algo.reward_key] = reward
    cls = load_class(algo.args)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**recipe.stage3_values | dict(algo.fixed) | {k: v for k, v in wired.items() if k in names})
