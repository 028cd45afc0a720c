"""The config classes: shared fields declared once, typed choices, and every cross-field rule checked in config.py."""

import dataclasses
import inspect
import re
import typing

import pytest

from ppo_lm.advantages import ADVANTAGE_ESTIMATORS
from ppo_lm.config import (
    DTYPES,
    LR_SCHEDULERS,
    MIXED_PRECISIONS,
    SCALE_REWARDS,
    AdvantageEstimatorName,
    DTypeName,
    FinetuneConfig,
    KLEstimatorName,
    LossAggregationName,
    LRSchedulerName,
    MixedPrecisionName,
    PolicyLossName,
    PPOConfig,
    RewardConfig,
    RunConfig,
    ScaleRewardsName,
    SFTConfig,
    TrainConfig,
)
from ppo_lm.losses import KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES
from ppo_lm.runs import CommandLineError, fields_help, parse_config

SHARED = {"model_name", "use_lora", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_layers",
          "batch_size", "micro_batch_size", "gradient_checkpointing", "learning_rate", "max_grad_norm",
          "step_rollback", "on_nonfinite", "max_skipped_steps"}
STAGES = (PPOConfig, SFTConfig, RewardConfig)


def unboxed(text):
    """tyro's error box as one line of words: the frame characters and line breaks dropped."""
    return " ".join(re.sub("[\u2500-\u257f]", " ", text).split())


def field_names(cls):
    return {field.name for field in dataclasses.fields(cls)}


# --- shared fields, declared once -------------------------------------------------------------------------------


def test_the_shared_training_fields_are_declared_once_in_train_config():
    assert field_names(TrainConfig) - field_names(RunConfig) == SHARED
    assert set(inspect.get_annotations(TrainConfig)) == SHARED
    for cls in (*STAGES, FinetuneConfig):
        assert SHARED.issubset(field_names(cls)), cls.__name__
        redeclared = SHARED & set(inspect.get_annotations(cls))
        assert not redeclared, f"{cls.__name__} redeclares {redeclared}"


def test_shared_fields_have_one_default_in_every_stage_and_lora_dropout_is_zero():
    for name in SHARED:
        assert len({repr(getattr(cls(), name)) for cls in STAGES}) == 1, name
    assert [cls().lora_dropout for cls in STAGES] == [0.0, 0.0, 0.0]
    # The original design's defaults stay PPOConfig's.
    ppo = PPOConfig()
    assert (ppo.learning_rate, ppo.value_learning_rate, ppo.batch_size, ppo.max_new_tokens, ppo.gamma,
            ppo.kl_coef) == (1e-5, 1e-4, 32, 10, 0.99, 0.1)


def test_every_field_of_every_stage_has_a_docstring():
    for cls in (RunConfig, TrainConfig, PPOConfig, FinetuneConfig, SFTConfig, RewardConfig):
        source = inspect.getsource(cls)
        for name in inspect.get_annotations(cls):
            after = source.split(f"\n    {name}: ", 1)[1].split("\n", 2)[1]
            assert after.strip().startswith('"""'), f"{cls.__name__}.{name} has no docstring"


# --- choices typed with Literal ---------------------------------------------------------------------------------

CHOICES = [
    (PPOConfig, "lr_scheduler", LRSchedulerName, LR_SCHEDULERS),
    (PPOConfig, "dtype", DTypeName, DTYPES),
    (PPOConfig, "kl_estimator", KLEstimatorName, KL_ESTIMATORS.names()),
    (PPOConfig, "advantage_estimator", AdvantageEstimatorName, ADVANTAGE_ESTIMATORS.names()),
    (PPOConfig, "policy_loss", PolicyLossName, POLICY_LOSSES.names()),
    (PPOConfig, "loss_aggregation", LossAggregationName, LOSS_AGGREGATIONS.names()),
    (PPOConfig, "scale_rewards", ScaleRewardsName, SCALE_REWARDS),
    (SFTConfig, "lr_scheduler", LRSchedulerName, LR_SCHEDULERS),
    (RewardConfig, "dtype", DTypeName, DTYPES),
    (SFTConfig, "mixed_precision", MixedPrecisionName, MIXED_PRECISIONS),
]


@pytest.mark.parametrize("cls, name, alias, allowed", CHOICES)
def test_each_choice_is_one_literal_that_validate_and_help_agree_on(cls, name, alias, allowed):
    assert typing.get_type_hints(cls)[name] == alias
    assert typing.get_args(alias) == allowed
    for value in allowed:
        groups = {"num_generations": 2} if name == "advantage_estimator" else {}  # group estimators need groups
        assert getattr(cls(**{name: value}, **groups), name) == value
    with pytest.raises(ValueError) as error:
        cls(**{name: "bogus"})
    assert f"{cls.__name__}.{name}='bogus' is invalid: must be one of {allowed}" in str(error.value)
    assert f"--{name}{{{','.join(allowed)}}}" in "".join(fields_help(cls).split())  # however the terminal wraps


def test_the_expected_choices():
    assert LR_SCHEDULERS == ("constant", "linear", "cosine")
    assert DTYPES == ("auto", "float32", "bfloat16", "float16", "bfloat16_if_native")
    assert KL_ESTIMATORS.names() == ("k1", "k3")
    assert ADVANTAGE_ESTIMATORS.names() == ("gae", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
    assert POLICY_LOSSES.names() == ("clipped", "gspo")
    assert LOSS_AGGREGATIONS.names() == ("token_mean", "sequence_mean", "sequence_sum")
    assert SCALE_REWARDS == ("group", "batch", "none")


def test_a_bad_choice_on_the_command_line_is_refused_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as error:
        parse_config(PPOConfig, {}, ["--lr_scheduler", "bogus"], prog="ppo-lm train")
    assert error.value.code == 2
    printed = capsys.readouterr()
    message = unboxed(printed.out + printed.err)
    assert "'bogus'" in message and "--lr_scheduler" in message and "constant" in message


def test_a_bad_choice_in_a_config_file_is_refused_naming_field_and_choices():
    with pytest.raises(ValueError, match=r"PPOConfig.kl_estimator='k2' is invalid: must be one of \('k1', 'k3'\)"):
        parse_config(PPOConfig, {"kl_estimator": "k2"}, [], prog="ppo-lm train")


def test_report_to_stays_a_comma_separated_string_checked_against_the_trackers():
    assert PPOConfig(report_to="tensorboard, wandb").trackers() == ["tensorboard", "wandb"]
    with pytest.raises(ValueError, match="report_to.*unknown tracker"):
        PPOConfig(report_to="tensorboard,mlflow")


# --- cross-field rules ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls, values, names", [
    (PPOConfig, dict(reward_fn="pkg.mod:fn", reward_model_name="runs/reward/final"),
     ["reward_model_name", "reward_fn"]),
    (PPOConfig, dict(batch_size=4, num_mini_batches=8), ["num_mini_batches", "batch_size"]),
    (PPOConfig, dict(batch_size=6, num_mini_batches=4), ["num_mini_batches", "batch_size", "minibatch"]),
    (PPOConfig, dict(eval_greedy=True, eval_samples_per_prompt=2), ["eval_samples_per_prompt", "eval_greedy"]),
    (PPOConfig, dict(lora_layers=[1]), ["lora_layers", "lora_target_modules"]),
    (SFTConfig, dict(lora_layers=[1]), ["lora_layers", "lora_target_modules"]),
    (RewardConfig, dict(reference_dataset="ref.jsonl", merge_lora=False), ["merge_lora", "reference_dataset"]),
])
def test_each_cross_field_rule_raises_at_construction_naming_the_fields(cls, values, names):
    with pytest.raises(ValueError) as error:
        cls(**values)
    message = str(error.value)
    assert cls.__name__ in message
    for name in names:
        assert name in message


def test_the_batch_rules_need_no_process_count_and_leave_micro_batches_alone():
    assert PPOConfig(batch_size=8, num_mini_batches=4).num_mini_batches == 4
    assert PPOConfig(batch_size=4, num_mini_batches=1, micro_batch_size=16).micro_batch_size == 16
    with pytest.raises(ValueError, match=r"num_mini_batches=4 is invalid: must divide batch_size \(6\)"):
        PPOConfig(batch_size=6, num_mini_batches=4)


def test_validate_runs_on_every_new_instance(capsys):
    config = PPOConfig(reward_fn="pkg.mod:fn")
    with pytest.raises(ValueError, match="reward_model_name.*reward_fn"):
        dataclasses.replace(config, reward_model_name="runs/reward/final")
    with pytest.raises(ValueError, match="must divide batch_size"):  # a config file's values
        parse_config(PPOConfig, {"batch_size": 6, "num_mini_batches": 4}, [], prog="ppo-lm train")
    with pytest.raises(SystemExit) as error:  # --FIELD VALUE: tyro reports the ValueError and exits
        parse_config(PPOConfig, {"batch_size": 6}, ["--num_mini_batches", "4"], prog="ppo-lm train")
    assert error.value.code == 2
    assert "must divide batch_size (6)" in unboxed(capsys.readouterr().err)
    with pytest.raises(CommandLineError, match="unexpected keyword"):
        parse_config(PPOConfig, {"no_such_field": 1}, [], prog="ppo-lm train")


def test_check_reward_source_wants_exactly_one_reward():
    PPOConfig(reward_fn="pkg.mod:fn").check_reward_source(has_callable=False)
    PPOConfig(reward_model_name="rm").check_reward_source(has_callable=False)
    PPOConfig().check_reward_source(has_callable=True)
    PPOConfig(reward_fn="pkg.mod:fn").check_reward_source(has_callable=True)  # the callable takes its place
    PPOConfig().check_reward_source(required=False)  # what validate() checks: a callable may come later
    with pytest.raises(ValueError, match="No reward.*reward_fn.*reward_model_name"):
        PPOConfig().check_reward_source(has_callable=False)
    with pytest.raises(ValueError, match="reward_model_name='rm' and a reward_fn callable are both given"):
        PPOConfig(reward_model_name="rm").check_reward_source(has_callable=True)


def test_check_prompt_room_is_the_context_less_the_response():
    config = PPOConfig(max_new_tokens=10)
    assert config.check_prompt_room(2048) == 2038
    assert config.check_prompt_room(11) == 1
    for context in (10, 4):
        with pytest.raises(ValueError, match=rf"PPOConfig.max_new_tokens=10 leaves no room for a prompt in the "
                                             rf"model's context of {context} tokens"):
            config.check_prompt_room(context)


# --- the trainers check before any model loads ------------------------------------------------------------------

def test_the_trainers_check_a_config_changed_after_construction_before_loading(tmp_path):
    from ppo_lm.ppo_trainer import PPOTrainer
    from ppo_lm.sft_trainer import SFTTrainer

    missing = str(tmp_path / "no-model")  # loading it would be an OSError: a ValueError means nothing loaded
    config = PPOConfig(model_name=missing, reward_fn="pkg.mod:fn")
    config.batch_size = 6
    config.num_mini_batches = 4
    with pytest.raises(ValueError, match="must divide batch_size"):
        PPOTrainer(config)
    with pytest.raises(ValueError, match="reward_model_name='rm' and a reward_fn callable are both given"):
        PPOTrainer(PPOConfig(model_name=missing, reward_model_name="rm"), reward_fn=lambda p, c: [0.0] * len(p))
    with pytest.raises(ValueError, match="No reward"):
        PPOTrainer(PPOConfig(model_name=missing))
    sft = SFTConfig(model_name=missing)
    sft.lora_dropout = 1.5
    with pytest.raises(ValueError, match=r"SFTConfig.lora_dropout=1.5 is invalid"):
        SFTTrainer(sft)


# --- defaults and single-field checks --------------------------------------------------------------------------


def test_config_defaults_keep_the_original_design():
    config = PPOConfig()
    assert (config.model_name, config.lora_r, config.lora_alpha, config.lora_dropout) == (
        "Qwen/Qwen3-0.6B-Base", 16, 32, 0.0)
    assert (config.learning_rate, config.value_learning_rate, config.batch_size, config.max_new_tokens) == (
        1e-5, 1e-4, 32, 10)
    assert (config.gamma, config.lam, config.kl_coef, config.clip_epsilon) == (0.99, 0.95, 0.1, 0.2)
    assert (config.temperature, config.top_k, config.top_p) == (1.0, 50, 0.95)


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("learning_rate", -1e-5, "> 0"),
        ("clip_epsilon", 0.0, "> 0"),
        ("top_p", 1.5, "(0, 1]"),
        ("top_p", 0.0, "(0, 1]"),
        ("kl_estimator", "k2", "k1"),
        ("batch_size", 0, ">= 1"),
        ("gamma", 1.5, "[0, 1]"),
        ("target_kl", -0.1, "None"),
        ("dtype", "float8", "bfloat16"),
        ("temperature", float("nan"), "> 0"),
    ],
)
def test_config_rejects_invalid_values_naming_field_and_value(field, value, allowed):
    with pytest.raises(ValueError) as error:
        PPOConfig(**{field: value})
    message = str(error.value)
    assert field in message and repr(value) in message and allowed in message


# --- groups and the critic-free estimators ------------------------------------------------------------------------

@pytest.mark.parametrize("settings, message", [
    (dict(batch_size=10, num_generations=4), "PPOConfig.batch_size=10 is invalid: must be a multiple of "
                                              "num_generations (4)"),
    (dict(advantage_estimator="grpo"), "PPOConfig.num_generations=1 is invalid: must be >= 2 with "
                                       "advantage_estimator='grpo'"),
    (dict(advantage_estimator="rloo", num_generations=1), "must be >= 2 with advantage_estimator='rloo'"),
    (dict(advantage_estimator="grpo", num_generations=2, value_model_name="some/model"),
     "value_model_name='some/model' is invalid: must be None with advantage_estimator='grpo', which trains no value "
     "model"),
    (dict(reward_fn=["a.py:f", "b.py:g"], reward_weights=[1.0]),
     "reward_weights=[1.0] is invalid: must be 2 finite number(s), one per function of reward_fn (a.py:f, b.py:g)"),
    (dict(reward_weights=[1.0], reward_model_name="rm"), "reward_weights=[1.0] is invalid: needs reward functions"),
    (dict(reward_fn=[]), "reward_fn=[] is invalid: must name at least one function"),
    (dict(advantage_estimator="ppo2"), "advantage_estimator='ppo2' is invalid: must be one of ('gae', 'grpo', "
                                       "'rloo', 'reinforce_pp', 'reinforce_pp_baseline')"),
    (dict(dual_clip=1.0), "PPOConfig.dual_clip=1.0 is invalid: must be a number > 1"),
    (dict(clip_epsilon_high=-0.1), "PPOConfig.clip_epsilon_high=-0.1 is invalid: must be a finite number > 0"),
    (dict(kl_loss_coef=-1.0), "PPOConfig.kl_loss_coef=-1.0 is invalid"),
    (dict(compile_layers=True, gradient_checkpointing=True), "PPOConfig.compile_layers=True is invalid: is not "
                                                              "supported with gradient_checkpointing"),
    (dict(value_layers=0), "PPOConfig.value_layers=0 is invalid: must be an integer >= 1, or None"),
    (dict(value_layers=2, shared_value_trunk=True), "PPOConfig.value_layers=2 is invalid: trains part of a value "
                                                    "model of its own, and shared_value_trunk has none"),
    (dict(advantage_estimator="rloo", num_generations=2, value_layers=2),
     "value_layers=2 is invalid: must be None with advantage_estimator='rloo', which trains no value model"),
])
def test_bad_group_and_estimator_settings_are_refused_with_a_message(settings, message):
    with pytest.raises(ValueError) as error:
        PPOConfig(**settings)
    assert message in str(error.value)


def test_a_step_draws_batch_size_over_num_generations_prompts():
    assert PPOConfig(batch_size=32, num_generations=4).items_per_step == 8
    assert PPOConfig(batch_size=32).items_per_step == 32 and SFTConfig(batch_size=8).items_per_step == 8
    assert not PPOConfig(advantage_estimator="grpo", num_generations=2).needs_value_model
    assert PPOConfig().needs_value_model
    assert not PPOConfig(kl_coef=0.0).uses_reference and PPOConfig(kl_coef=0.0, kl_loss_coef=0.1).uses_reference
    assert PPOConfig(kl_coef=0.0, adaptive_kl_target=6.0).uses_reference


def test_a_bad_group_setting_on_the_command_line_stops_before_any_model_loads(capsys):
    with pytest.raises(SystemExit) as error:
        parse_config(PPOConfig, {}, ["--advantage_estimator", "grpo", "--batch_size", "8"], prog="ppo-lm train")
    assert error.value.code == 2
    printed = capsys.readouterr()
    assert "num_generations=1 is invalid: must be >= 2 with advantage_estimator='grpo'" in unboxed(printed.out
                                                                                                + printed.err)


def test_several_reward_functions_and_their_weights_parse_from_the_command_line_and_a_file():
    config = parse_config(PPOConfig, {}, ["--reward_fn", "a.py:f", "b.py:g", "--reward_weights", "1", "0.5"],
                          prog="ppo-lm train")
    assert config.reward_fn == ["a.py:f", "b.py:g"] and config.reward_weights == [1.0, 0.5]
    assert parse_config(PPOConfig, {}, ["--reward_fn", "a.py:f"], prog="ppo-lm train").reward_fn == "a.py:f"
    config = parse_config(PPOConfig, {"reward_fn": ["a.py:f"], "reward_weights": [2.0]}, [], prog="ppo-lm train")
    assert config.reward_functions() == ["a.py:f"] and config.reward_weights == [2.0]


# --- micro-batches by tokens ------------------------------------------------------------------------------------------


def test_micro_batch_tokens_is_auto_by_default_and_parses_as_a_number_auto_or_none():
    assert PPOConfig().micro_batch_tokens == "auto" and PPOConfig().micro_batch_size is None
    for argument, value in (("4096", 4096), ("auto", "auto"), ("None", None)):
        config = parse_config(PPOConfig, {}, ["--micro_batch_tokens", argument], prog="ppo-lm train")
        assert config.micro_batch_tokens == value
    assert parse_config(PPOConfig, {"micro_batch_tokens": 512}, [], prog="ppo-lm train").micro_batch_tokens == 512
    assert PPOConfig(micro_batch_size=4, micro_batch_tokens=512).micro_batch_size == 4  # both may be set: rows win


@pytest.mark.parametrize("value", [0, -5, "big", 2.5, True])
def test_a_bad_micro_batch_tokens_is_refused_naming_what_is_allowed(value):
    with pytest.raises(ValueError, match=r"micro_batch_tokens=.* is invalid: must be an integer >= 1, 'auto' or None"):
        PPOConfig(micro_batch_tokens=value)
