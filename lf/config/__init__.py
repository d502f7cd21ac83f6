"""lf's argument groups, with LLaMA-Factory's key names, and `lf train`'s config parser and rules."""

from lf.config.data import DataArguments
from lf.config.evaluation import EvaluationArguments
from lf.config.export import ExportArguments
from lf.config.finetuning import FinetuningArguments
from lf.config.generation import GeneratingArguments
from lf.config.model import ModelArguments
from lf.config.parser import InferConfig, TrainConfig, parse_infer_args, parse_train_args, read_config
from lf.config.rules import RULES, Rule

__all__ = ["DataArguments", "EvaluationArguments", "ExportArguments", "FinetuningArguments", "GeneratingArguments",
           "InferConfig", "ModelArguments", "RULES", "Rule", "TrainConfig", "parse_infer_args", "parse_train_args",
           "read_config"]
