"""lf's argument groups, with LLaMA-Factory's key names, and `lf train`'s config parser and rules."""

from lf.config.data import DataArguments
from lf.config.finetuning import FinetuningArguments
from lf.config.generation import GeneratingArguments
from lf.config.model import ModelArguments
from lf.config.parser import TrainConfig, parse_train_args, read_config
from lf.config.rules import RULES, Rule

__all__ = ["DataArguments", "FinetuningArguments", "GeneratingArguments", "ModelArguments", "RULES", "Rule",
           "TrainConfig", "parse_train_args", "read_config"]
