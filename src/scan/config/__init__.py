"""The run configuration: typed, frozen dataclasses (schema) read from YAML with dotted overrides
(loading). A misspelt key or a value out of range is a ConfigError before any work starts."""
from scan.config.loading import (
                                 builtin_config_names,
                                 config_from_dict,
                                 config_yaml,
                                 flatten,
                                 merge,
                                 parse_override,
                                 read_config,
                                 read_yaml,
                                 save_config,
                                 validate,
)
from scan.config.schema import (
                                 AUTO,
                                 AugmentConfig,
                                 ChooseConfig,
                                 ClusterConfig,
                                 Config,
                                 DataConfig,
                                 MineConfig,
                                 ModelConfig,
                                 PretextConfig,
                                 RefineConfig,
                                 SelfLabelConfig,
                                 TrainingConfig,
)
from scan.core.errors import ConfigError

__all__ = ["AUTO", "AugmentConfig", "ChooseConfig", "ClusterConfig", "Config", "ConfigError", "DataConfig", "MineConfig", "ModelConfig",
           "PretextConfig", "RefineConfig", "SelfLabelConfig", "TrainingConfig", "builtin_config_names",
           "config_from_dict", "config_yaml", "flatten", "merge", "parse_override", "read_config", "read_yaml", "save_config",
           "validate"]
