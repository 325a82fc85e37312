"""Typed configs (`schema`) and YAML loading with inheritance and overrides (`loader`)."""
from .loader import load_config, to_dict, to_yaml
from .schema import (ConfigError, DataConfig, EvalConfig, ExperimentConfig, LoggingConfig, LossConfig,
                     ModelConfig, OptimConfig, ParallelConfig, PromptConfig, RewardConfig, RolloutConfig,
                     TeacherConfig, TokenizerConfig, TrainConfig)

__all__ = [
    "load_config", "to_dict", "to_yaml", "ConfigError", "DataConfig", "EvalConfig", "ExperimentConfig",
    "LoggingConfig", "LossConfig", "ModelConfig", "OptimConfig", "ParallelConfig", "PromptConfig",
    "RewardConfig", "RolloutConfig", "TeacherConfig", "TokenizerConfig", "TrainConfig",
]
