"""Typed configs (`schema`) and YAML loading with inheritance and overrides (`loader`)."""
from .loader import load_config, to_dict, to_yaml
from .schema import (ClipConfig, ConfigError, DataConfig, EvalConfig, ExperimentConfig, GateConfig, LoggingConfig,
                     LookaheadConfig, LossConfig, ModelConfig, OpsdConfig, OptimConfig, ParallelConfig, PromptConfig,
                     RatioConfig, RewardConfig, RolloutConfig, TeacherConfig, TokenizerConfig, TrainConfig)

__all__ = [
    "load_config", "to_dict", "to_yaml", "ConfigError", "DataConfig", "EvalConfig", "ExperimentConfig",
    "LoggingConfig", "LossConfig", "RatioConfig", "GateConfig", "LookaheadConfig", "ClipConfig", "OpsdConfig",
    "ModelConfig", "OptimConfig", "ParallelConfig", "PromptConfig", "RewardConfig", "RolloutConfig",
    "TeacherConfig", "TokenizerConfig", "TrainConfig",
]
