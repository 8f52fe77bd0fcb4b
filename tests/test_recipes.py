"""Bundled recipes: they parse into the trainers' config classes / compose with verl's Hydra config,
their key values equal the official ones (hard-coded below by hand from the official files named by
the source tags of docs/recipes.md, an independent source), every value carries a citation comment
naming a source tag of docs/recipes.md, docs/algorithms.md or "our choice", and the provenance tables
of docs/recipes.md show the values the recipes resolve to.

The GCPOTrainer / COPOTrainer recipes import classes written on other branches: on a branch
without them those cases fail with an ImportError naming the class (deliberately not skipped).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from grouprl import recipes

REPO = Path(__file__).resolve().parents[1]
TRL_RECIPES = sorted(n for n, p in recipes.recipe_paths().items() if p.parent.name == "trl")
VERL_RECIPES = sorted(n for n, p in recipes.recipe_paths().items() if p.parent.name == "verl")
GPU_TRL_RECIPES = [n for n in TRL_RECIPES if not n.startswith("tiny_")]

# ----------------------------------------------------------------------------- expected values
# Copied by hand from the official files (source tags of docs/recipes.md named on each entry).
A3_1P5B = {  # RSG (open-rs recipes/gpg.yaml) + RST (train.sh): GPG-RS1
    "model_name_or_path": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
    "learning_rate": 1.0e-6,
    "lr_scheduler_type": "cosine_with_min_lr",
    "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
    "max_completion_length": 3584,
    "max_prompt_length": 512,
    "num_generations": 6,
    "per_device_train_batch_size": 6,
    "max_steps": 100,
    "temperature": 0.7,
    "reward_weights": [1.0, 2.0],
    "seed": 42,
    "vllm_max_model_length": 4608,
}
A3_MATH7B = {  # SRL (open-r1 config_simple_rl.yaml, GPG fork) and V1 / V1NS
    "model_name_or_path": "Qwen/Qwen2.5-Math-7B",
    "learning_rate": 3.0e-6,
    "lr_scheduler_type": "cosine",
    "max_prompt_length": 512,
    "max_completion_length": 1024,
    "num_generations": 8,
    "per_device_train_batch_size": 16,
    "gradient_accumulation_steps": 4,
    "temperature": 0.9,
    "num_train_epochs": 1,
}
ACC_FORMAT = {  # SRL 46-51 / V1 49-54: [accuracy, format], weights [1, 1] (RW format_reward: the think/answer regex)
    "reward_funcs": ["grouprl.rewards.accuracy_reward", "grouprl.rewards.think_answer_format_reward"],
    "reward_weights": [1.0, 1.0],
}
EXPECTED_TRL = {
    # GTRS + TRL69: open_rs_1p5b = F_norm group std, alpha 1, no resampling; no KL in the loss
    "gpg_rs1_1p5b": {**A3_1P5B, "advantage_norm": "group", "age": False, "valid_threshold": 0.0, "beta": 0.0},
    "gpg_rs3_1p5b": {**A3_1P5B, "advantage_norm": "group", "age": False, "valid_threshold": 0.0, "beta": 0.0,
                     "dataset_path": "data/open-rs"},
    # RSR: the GRPO recipe runs 500 steps (RSR 37); TRL69: beta 0.04, local token mean ("bnpo")
    "grpo_rs1_1p5b": {**A3_1P5B, "beta": 0.04, "max_steps": 500, "loss_type": "bnpo"},
    "grpo_rs3_1p5b": {**A3_1P5B, "beta": 0.04, "max_steps": 500, "loss_type": "bnpo", "dataset_path": "data/open-rs"},
    # SRL + TRL016: beta 0.04, scale_rewards True, local token mean ("bnpo"), accuracy + format
    "grpo_math7b": {**A3_MATH7B, **ACC_FORMAT, "beta": 0.04, "loss_type": "bnpo", "scale_rewards": "group"},
    # GPG-README ablation rows on V1 / V1NS
    "gpg_math7b_f1": {**A3_MATH7B, **ACC_FORMAT, "advantage_norm": "none", "age": False, "valid_threshold": 0.0,
                      "beta": 0.0},
    "gpg_math7b_fstd": {**A3_MATH7B, **ACC_FORMAT, "advantage_norm": "group", "age": False, "valid_threshold": 0.0},
    "gpg_math7b_age": {**A3_MATH7B, **ACC_FORMAT, "advantage_norm": "none", "age": True, "valid_threshold": 0.0},
    "gpg_math7b_age_betath": {**A3_MATH7B, **ACC_FORMAT, "advantage_norm": "none", "age": True,
                              "valid_threshold": 0.6},
    # GPG-7B: L35 + TS7 overrides; raw prompts without a chat template (GPGPY make_conversation_math35)
    "gpg_7b_simplerl": {
        "model_name_or_path": "Qwen/Qwen2.5-Math-7B", "learning_rate": 1.0e-6,
        "lr_scheduler_type": "constant_with_warmup", "warmup_steps": 0.03, "max_prompt_length": 768,
        "max_completion_length": 2048, "num_generations": 8, "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 4, "num_train_epochs": 5, "temperature": 1.0, "top_p": 1.0,
        "advantage_norm": "none", "age": True, "valid_threshold": 0.5, "beta": 0.0, "system_prompt": None,
        "raw_prompt": True, "reward_funcs": ["grouprl.rewards.accuracy_reward"],
    },
    # GOLD / GSPO: no KL, GSPO sequence ratio with eps 3e-4 / 4e-4
    "gcpo_gold_1p5b": {"gold_trigger": "all_wrong", "gold_placement": "replace",
                  "model_name_or_path": A3_1P5B["model_name_or_path"], "beta": 0.0,
                       "importance_sampling_level": "sequence", "epsilon": 3e-4, "epsilon_high": 4e-4,
                       "reference_column": "solution"},
    "gcpo_gold_math7b": {"gold_trigger": "all_wrong", "gold_placement": "replace",
                  "model_name_or_path": A3_MATH7B["model_name_or_path"], "beta": 0.0,
                         "importance_sampling_level": "sequence", "epsilon": 3e-4, "epsilon_high": 4e-4,
                         "reference_column": "solution"},
    # CP / CP7: k 5, b 1, soft-with-zero, clip 0.2/0.2, lr 1e-6, no KL; n 6 (run_copo.sh) / 8 (7B script);
    # 70 rollout steps x 16 mini-batches of 32 prompts (train_batch_size 512)
    "copo_1p5b": {"entropy_reward_coef": False, "dual_clip": 3.0, "loss_type": "grpo", "system_prompt": None,
                  "gate_k": 5.0, "gate_b": 1.0, "blend": "soft-with-zero", "epsilon": 0.2, "epsilon_high": 0.2,
                  "learning_rate": 1e-6, "beta": 0.0, "num_generations": 6, "temperature": 1.0,
                  "max_steps": 70 * 16, "dataset_path": "data/dapo-math-17k"},
    "copo_math7b": {"entropy_reward_coef": False, "dual_clip": 3.0, "loss_type": "grpo", "system_prompt": None,
                  "gate_k": 5.0, "gate_b": 1.0, "blend": "soft-with-zero", "epsilon": 0.2, "epsilon_high": 0.2,
                    "learning_rate": 1e-6, "beta": 0.0, "num_generations": 8, "temperature": 1.0,
                    "max_steps": 70 * 16, "max_completion_length": 2048, "dataset_path": "data/dapo-math-17k"},
    # GC / GCY / GCA: x 0.4, y 0.8, k3 weights under the current policy, entropy penalty 0.02 (7B), clip 0.2/0.28,
    # dual clip 3, lr 1e-6, wd 1e-2, top_p 0.99, n 8, 2 epochs; the official format prompt (GC 34)
    "guidance_1p5b": {"rank_x": 0.4, "rank_y": 0.8, "weights_from": "current", "entropy_penalty_coef": 0.02,
                      "negative_prompt_type": "wrong_answer", "dynamic_filter": True, "epsilon": 0.2,
                      "epsilon_high": 0.28, "dual_clip": 3.0, "learning_rate": 1e-6, "weight_decay": 0.01,
                      "top_p": 0.99, "num_generations": 8, "num_train_epochs": 2, "beta": 0.0,
                      "prompt_template": "gcpo-guidance", "system_prompt": None},
    "guidance_math7b": {"rank_x": 0.4, "rank_y": 0.8, "weights_from": "current", "entropy_penalty_coef": 0.02,
                        "negative_prompt_type": "wrong_answer", "dynamic_filter": True, "epsilon": 0.2,
                        "epsilon_high": 0.28, "dual_clip": 3.0, "learning_rate": 1e-6, "weight_decay": 0.01,
                        "top_p": 0.99, "num_generations": 8, "num_train_epochs": 2, "beta": 0.0,
                        "prompt_template": "gcpo-guidance", "system_prompt": None},
    "tiny_cpu_gpg": {"model_name_or_path": "tiny", "dataset_path": "toy", "use_vllm": False, "use_cpu": True},
}
# completions per optimizer step = per_device x processes x GA
EXPECTED_COMPLETIONS_PER_STEP = {
    "gpg_rs1_1p5b": 6 * 16 * 4,  # RSG 42 x RST 3 x RSG 19 = 384 (64 prompts x 6)
    "grpo_rs1_1p5b": 6 * 16 * 4,
    "copo_1p5b": 32 * 6,  # CP 48: ppo_mini_batch_size 32 prompts x n 6 (CP 62)
    "copo_math7b": 32 * 8,  # CP 48: 32 prompts x n 8 (CP7 53)
    "guidance_1p5b": 128 * 8,  # GC 15: global_batch_size 128 prompts x n 8
    "guidance_math7b": 128 * 8,
}
# prompts per generation (rollout): TRL generation batch / num_generations
EXPECTED_PROMPTS_PER_ROLLOUT = {"copo_1p5b": 512, "copo_math7b": 512, "guidance_1p5b": 384, "guidance_math7b": 384}

EXPECTED_VERL = {
    # the project's GPG-Zero setting (not published upstream) and GPG-PAPER
    "gpg_zero_math7b_verl": {
        "actor_rollout_ref.model.path": "Qwen/Qwen2.5-Math-7B", "data.train_batch_size": 144,
        "actor_rollout_ref.rollout.n": 8, "actor_rollout_ref.actor.optim.lr": 1e-6,
        "actor_rollout_ref.actor.optim.weight_decay": 0.1, "trainer.total_training_steps": 1100,
        "algorithm.grouprl.gpg.valid_threshold": 0.6, "algorithm.grouprl.gpg.use_age": True,
        "algorithm.grouprl.gpg.f_norm": "none", "actor_rollout_ref.actor.use_kl_loss": False,
        "algorithm.adv_estimator": "grouprl_gpg", "actor_rollout_ref.actor.policy_loss.loss_mode": "grouprl_pg",
    },
    "grpo_zero_math7b_verl": {
        "data.train_batch_size": 144, "actor_rollout_ref.rollout.n": 8, "actor_rollout_ref.actor.optim.lr": 1e-6,
        "trainer.total_training_steps": 1100, "algorithm.adv_estimator": "grpo",
    },
    # GSPO eps 3e-4 / 4e-4
    "gcpo_gold_math7b_verl": {
        "actor_rollout_ref.actor.clip_ratio_low": 3e-4, "actor_rollout_ref.actor.clip_ratio_high": 4e-4,
        "algorithm.grouprl.gcpo.trigger": "all_wrong", "algorithm.grouprl.gcpo.placement": "replace",
        "actor_rollout_ref.actor.policy_loss.loss_mode": "gspo", "algorithm.adv_estimator": "grouprl_gcpo",
    },
    # CP / CP7
    "copo_math7b_verl": {
        "data.train_batch_size": 512, "actor_rollout_ref.actor.ppo_mini_batch_size": 32,
        "actor_rollout_ref.rollout.n": 8, "trainer.total_training_steps": 70,
        "actor_rollout_ref.actor.clip_ratio_low": 0.2, "actor_rollout_ref.actor.clip_ratio_high": 0.2,
        "algorithm.grouprl.copo.gate_k": 5.0, "algorithm.grouprl.copo.gate_b": 1.0,
        "algorithm.grouprl.copo.blend": "soft-with-zero", "algorithm.grouprl.copo.entropy_reward_coef": False,
        "actor_rollout_ref.actor.loss_agg_mode": "seq-mean-token-mean",
        "data.max_prompt_length": 1024, "data.max_response_length": 2048,
    },
    # GC / GCY / GCA; prompts prepared with the official format (GC 34)
    "guidance_math7b_verl": {
        "data.train_files": "data/dapo-math-17k-gcpo-guidance/train.parquet",
        "data.train_batch_size": 384, "actor_rollout_ref.actor.ppo_mini_batch_size": 128,
        "actor_rollout_ref.rollout.n": 8, "actor_rollout_ref.actor.clip_ratio_high": 0.28,
        "actor_rollout_ref.actor.clip_ratio_c": 3.0, "actor_rollout_ref.actor.optim.weight_decay": 0.01,
        "actor_rollout_ref.rollout.top_p": 0.99, "trainer.total_epochs": 2,
        "algorithm.grouprl.guidance.rank_x": 0.4, "algorithm.grouprl.guidance.rank_y": 0.8,
        "algorithm.grouprl.guidance.negative_prompt_type": "wrong_answer",
        "algorithm.grouprl.guidance.dynamic_filter": True,
        "actor_rollout_ref.actor.policy_loss.grouprl.entropy_penalty_coef": 0.02,
    },
}


def _plain(value):
    """Enums (e.g. SchedulerType) as their value, for comparison with YAML numbers and strings."""
    return getattr(value, "value", value)


def _parse_trl(name, tmp_path):
    from grouprl.train_trl import parse

    path = tmp_path / f"{name}.yaml"
    path.write_text(recipes.dump(recipes.resolve(name)))
    # bf16 recipes only validate on a machine without a GPU when use_cpu is set (transformers'
    # TrainingArguments check); a command-line flag wins over the YAML, as on the real command line.
    return parse(["--config", str(path), "--use_cpu", "true"])


def test_recipe_sets_are_complete():
    assert set(EXPECTED_TRL) == set(TRL_RECIPES)
    assert set(EXPECTED_VERL) == set(VERL_RECIPES)


# ----------------------------------------------------------------------------- TRL
@pytest.mark.parametrize("name", TRL_RECIPES)
def test_trl_recipe_parses_into_its_config_class(name, tmp_path):
    recipe_args, config, model_args = _parse_trl(name, tmp_path)
    trainer_path = recipes.resolve(name)["trainer"]
    assert type(config).__name__ == trainer_path.rsplit(".", 1)[1].replace("Trainer", "Config")
    parsed = {**vars(recipe_args), **vars(model_args), **vars(config)}
    for key, expected in EXPECTED_TRL[name].items():
        wanted = pytest.approx(expected) if isinstance(expected, float) else expected
        assert _plain(parsed[key]) == wanted, f"{name}: {key}={parsed[key]!r}, the official value is {expected!r}"


@pytest.mark.parametrize("name", GPU_TRL_RECIPES)
def test_trl_gpu_recipes_use_colocated_vllm_and_whole_groups(name):
    recipe = recipes.resolve(name)
    assert recipe["use_vllm"] is True and recipe["vllm_mode"] == "colocate"
    assert recipes.accelerate_config_path(recipe["accelerate_config"]).is_file()
    assert recipe["hardware"]
    processes, per_device = recipe["num_processes"], recipe["per_device_train_batch_size"]
    grad_accum = recipe["gradient_accumulation_steps"]
    generation = per_device * processes * recipe.get("steps_per_generation", grad_accum)
    assert generation % recipe["num_generations"] == 0
    if name in EXPECTED_COMPLETIONS_PER_STEP:
        assert per_device * processes * grad_accum == EXPECTED_COMPLETIONS_PER_STEP[name]
    if name in EXPECTED_PROMPTS_PER_ROLLOUT:
        assert generation // recipe["num_generations"] == EXPECTED_PROMPTS_PER_ROLLOUT[name]


def test_overlay_changes_only_what_it_names():
    """The ablation overlays differ from each other only in F_norm / alpha / beta_th (and names)."""
    names = ["gpg_math7b_f1", "gpg_math7b_fstd", "gpg_math7b_age", "gpg_math7b_age_betath"]
    resolved = [recipes.resolve(n) for n in names]
    varying = {"advantage_norm", "age", "valid_threshold", "max_resample_rounds", "description", "output_dir",
               "recipe_name"}
    common = [{k: v for k, v in r.items() if k not in varying} for r in resolved]
    assert all(c == common[0] for c in common)
    assert common[0]["trainer"] == "grouprl_trl.GPGTrainer" and common[0]["learning_rate"] == 3.0e-6


# ----------------------------------------------------------------------------- verl
VERL_CONFIG_DIR = REPO / "grouprl_verl" / "configs"


def _compose_verl(name):
    from hydra import compose, initialize_config_dir, initialize_config_module

    recipe = recipes.resolve(name)
    config_name = recipes.VERL_ALGORITHMS[recipe["algorithm"]].config_name
    overrides = recipes.verl_hydra_overrides(recipe)
    if (VERL_CONFIG_DIR / f"{config_name}.yaml").is_file():
        with initialize_config_dir(str(VERL_CONFIG_DIR), version_base=None):
            return compose(config_name, overrides=overrides)
    # the GRPO baseline runs on verl's own ppo_trainer config
    assert config_name == "ppo_trainer", f"{name}: no base config {config_name}.yaml in {VERL_CONFIG_DIR}"
    with initialize_config_module("verl.trainer.config", version_base=None):
        return compose("ppo_trainer", overrides=overrides)


@pytest.mark.parametrize("name", VERL_RECIPES)
def test_verl_recipe_composes_with_hydra(name):
    from omegaconf import OmegaConf

    cfg = _compose_verl(name)
    assert OmegaConf.select(cfg, "actor_rollout_ref.rollout.name") == "vllm"
    assert OmegaConf.select(cfg, "reward.custom_reward_function.path") == "pkg://grouprl.rewards"
    assert OmegaConf.select(cfg, "reward.custom_reward_function.name") == "compute_score"
    n_gpus = OmegaConf.select(cfg, "trainer.n_gpus_per_node") * OmegaConf.select(cfg, "trainer.nnodes")
    samples = OmegaConf.select(cfg, "data.train_batch_size") * OmegaConf.select(cfg, "actor_rollout_ref.rollout.n")
    assert samples % n_gpus == 0  # verl's validate_config rule
    assert OmegaConf.select(cfg, "data.train_batch_size") % OmegaConf.select(
        cfg, "actor_rollout_ref.actor.ppo_mini_batch_size") == 0
    for key, expected in EXPECTED_VERL[name].items():
        value = OmegaConf.select(cfg, key, default="<missing>")
        assert value == (pytest.approx(expected) if isinstance(expected, float) else expected), \
            f"{name}: {key}={value!r}, the official value is {expected!r}"


def test_verl_sections_use_the_single_prefix_mapping():
    recipe = recipes.resolve("copo_math7b_verl")
    args = recipes.verl_hydra_overrides(recipe)
    assert "++algorithm.grouprl.copo.gate_k=5.0" in args
    guidance = recipes.verl_hydra_overrides(recipes.resolve("guidance_math7b_verl"))
    assert "++actor_rollout_ref.actor.policy_loss.grouprl.entropy_penalty_coef=0.02" in guidance
    gpg = recipes.verl_hydra_overrides(recipes.resolve("gpg_zero_math7b_verl"))
    assert "++algorithm.grouprl.gpg.valid_threshold=0.6" in gpg
    assert "algorithm.adv_estimator=grouprl_gpg" in gpg


# ----------------------------------------------------------------------------- citations
DOCS = REPO / "docs"
EXEMPT_KEYS = {"base", "backend", "description", "hardware", "trainer", "algorithm", "overrides",
               "grouprl_estimator", "grouprl_policy_loss", "prepare"}
KEY_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*):(\s|$)")


def source_tags() -> set[str]:
    """The tags of the Sources table of docs/recipes.md (first column, in backticks)."""
    text = (DOCS / "recipes.md").read_text()
    section = text.split("## Sources", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([A-Za-z0-9-]+)` \|", section, re.M))


def cites_docs(comment: str, tags: set[str]) -> bool:
    """A citation names a source tag of docs/recipes.md, a docs/ page, or says "our choice"."""
    if "our choice" in comment or re.search(r"docs/\w+\.md", comment):
        return True
    return any(re.search(rf"(?<![\w-]){re.escape(tag)}(?![\w-])", comment) for tag in tags)


def _all_recipe_files():
    return sorted(p for p in recipes.RECIPES_DIR.glob("*/*.yaml") if p.parent.name in recipes.BACKENDS)


@pytest.mark.parametrize("path", _all_recipe_files(), ids=lambda p: p.name)
def test_every_value_cites_a_source_of_docs_or_says_our_choice(path):
    tags = source_tags()
    missing = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = KEY_LINE.match(line)
        if not match or match.group(1) in EXEMPT_KEYS:
            continue
        comment = line.split("#", 1)[1] if "#" in line else ""
        if not cites_docs(comment, tags):
            missing.append(f"{path.name}:{number}: {line.strip()}")
    assert not missing, "values without a citation of docs/ (a source tag, a docs page or 'our choice'):\n" + \
        "\n".join(missing)


def test_citation_check_catches_an_uncited_or_unknown_source():
    """The checker itself: a tag of the Sources table, a docs page or "our choice" pass; an unknown tag,
    a reference to notes outside the repository or a bare comment do not."""
    tags = source_tags()
    assert {"RSG", "SRL", "TS7", "GT7", "GC", "GCY", "CP", "CP7", "GOLD", "GSPO", "TRL016"} <= tags
    assert cites_docs(" RSG 25", tags) and cites_docs(" our choice", tags)
    assert cites_docs(" docs/algorithms.md GPG", tags)
    assert not cites_docs(" a.3 open-rs", tags) and not cites_docs(" brief", tags)
    assert not cites_docs(" RSGX 3", tags) and not cites_docs(" chosen by me", tags)
    from test_docs import OUTSIDE_NOTES  # notes outside the repository are never a source

    assert not any(OUTSIDE_NOTES.search(p.read_text()) for p in _all_recipe_files())


# ----------------------------------------------------------------------------- provenance tables
PROVENANCE_HEADING = re.compile(r"^### Provenance: (.*)$", re.M)
CODE = re.compile(r"^`([^`]*)`$")


def provenance_tables() -> list[tuple[list[str], list[tuple[str, str]]]]:
    """(recipe names, [(field cell, ours cell)]) per provenance table of docs/recipes.md."""
    text = (DOCS / "recipes.md").read_text()
    known = set(recipes.recipe_paths())
    tables = []
    for match in PROVENANCE_HEADING.finditer(text):
        names = [n for n in re.findall(r"`([^`]+)`", match.group(1)) if n in known]
        rows = []
        for line in text[match.end():].split("\n### ", 1)[0].splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not line.startswith("|") or cells[0] in ("field", "---") or len(cells) != 4:
                continue
            rows.append((cells[0], cells[1]))
        tables.append((names, rows))
    return tables


def _yaml_value(text: str):
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _resolved_value(name: str, key: str, tmp_path):
    """``key`` of recipe ``name`` as ``grouprl train NAME --dry-run`` resolves it: a recipe key (dotted into
    mappings; verl: a Hydra key of ``overrides`` or ``section.key``), else the parsed TRL config's field."""
    recipe = recipes.resolve(name)
    if recipe["backend"] == "verl" and key in recipe.get("overrides", {}):
        return recipe["overrides"][key]
    node = recipe
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            break
        node = node[part]
    else:
        return node
    assert recipe["backend"] == "trl", f"{name}: {key} is not in the resolved verl recipe"
    recipe_args, config, model_args = _parse_trl(name, tmp_path)
    parsed = {**vars(recipe_args), **vars(model_args), **vars(config)}
    assert key in parsed, f"{name}: {key} is neither a recipe key nor a config field"
    return _plain(parsed[key])


def test_every_recipe_has_a_provenance_table():
    covered = {n for names, _ in provenance_tables() for n in names}
    assert set(recipes.recipe_paths()) - covered == {"tiny_cpu_gpg"}
    assert all(names for names, _ in provenance_tables()), "a provenance heading names no bundled recipe"


def test_provenance_tables_show_the_resolved_values(tmp_path):
    """Every row whose field is a recipe key in backticks holds that recipe's resolved value, in backticks."""
    checked, wrong = 0, []
    for names, rows in provenance_tables():
        for field_cell, ours in rows:
            key = CODE.match(field_cell)
            if not key:
                continue
            value = CODE.match(ours)
            assert value, f"{names}: the row of {field_cell} needs our value in backticks, got {ours!r}"
            expected = _yaml_value(value.group(1))
            for name in names:
                actual = _resolved_value(name, key.group(1), tmp_path)
                same = actual == pytest.approx(expected) if isinstance(expected, float) else actual == expected
                if not same:
                    wrong.append(f"{name}: {key.group(1)} is {actual!r}, docs/recipes.md says {expected!r}")
                checked += 1
    assert not wrong, "\n".join(wrong)
    assert checked > 250  # the tables are not silently skipped


def test_provenance_check_catches_a_stale_value(tmp_path, monkeypatch):
    """The check itself: a table row that disagrees with the recipe is reported."""
    stale = [(["grpo_rs1_1p5b"], [("`max_steps`", "`100`")])]
    monkeypatch.setattr(__import__(__name__), "provenance_tables", lambda: stale)
    with pytest.raises(AssertionError, match="grpo_rs1_1p5b: max_steps is 500, docs/recipes.md says 100"):
        test_provenance_tables_show_the_resolved_values(tmp_path)


# The official GPG loop (docs/recipes.md, "GPG's official loop"): recipe field -> official value. The last two act
# only when the threshold runs (valid_threshold > 0).
GPG_OFFICIAL_LOOP = {"steps_per_generation": 1, "loss_normalization": "per_device"}
GPG_OFFICIAL_THRESHOLD = {"valid_count": "global", "carry_over": False}


def _provenance_rows_of(name: str) -> set[str]:
    """Field cells of every provenance table that covers ``name``, and of the table a "differences from X" table
    builds on."""
    text = (DOCS / "recipes.md").read_text()
    bases = dict(re.findall(r"^### Provenance: `([^`]+)` \(differences from (\w+)\)", text, re.M))
    fields = set()
    for names, rows in provenance_tables():
        if name in names or bases.get(name) in names:
            fields |= {cell for cell, _ in rows}
    return fields


def test_gpg_reproduction_recipes_select_the_official_loop(tmp_path):
    """Every bundled GPG recipe that reproduces an official TRL run generates per micro-step, normalises per
    device and, with the threshold, counts globally and drops the surplus; its provenance table has these rows."""
    gpg = [n for n in recipes.recipe_paths()
           if n.startswith("gpg_") and recipes.resolve(n)["backend"] == "trl"]
    assert {"gpg_7b_simplerl", "gpg_rs1_1p5b", "gpg_rs3_1p5b", "gpg_math7b_age_betath"} <= set(gpg)
    for name in gpg:
        expected = dict(GPG_OFFICIAL_LOOP)
        if _resolved_value(name, "valid_threshold", tmp_path) > 0:
            expected |= GPG_OFFICIAL_THRESHOLD
        for key, value in expected.items():
            assert _resolved_value(name, key, tmp_path) == value, f"{name}: {key} must be {value!r} (official loop)"
            assert f"`{key}`" in _provenance_rows_of(name), f"docs/recipes.md: no `{key}` row for {name}"


def test_package_data_globs_cover_every_recipe_file():
    """A non-editable install ships exactly what pyproject's package-data lists."""
    text = (REPO / "pyproject.toml").read_text()
    globs = yaml.safe_load("[" + re.search(r'^grouprl = \[(.*)\]', text, re.M).group(1) + "]")
    for path in recipes.RECIPES_DIR.rglob("*.yaml"):
        rel = path.relative_to(REPO / "grouprl")
        assert any(rel.match(g) for g in globs), f"{rel} is not covered by package-data {globs}"


@pytest.mark.parametrize("name", sorted(recipes.recipe_paths()))
def test_every_data_source_a_recipe_names_can_be_prepared(name):
    """The preflight tells users to run `grouprl data prepare <name>`: the name must be a real source."""
    from grouprl.data import SOURCES

    recipe = recipes.resolve(name)
    named = [recipe["dataset_prepare"]] if recipe.get("dataset_prepare") else []
    for item in recipe.get("prepare") or []:
        named.append(item["name"] if isinstance(item, dict) else str(item).split()[0])  # "NAME --out DIR ..."
    unknown = [n for n in named if n not in SOURCES]
    assert not unknown, f"{name}: no `grouprl data prepare` source {unknown}; sources: {sorted(SOURCES)}"
