"""lf.train: one recipe per stage over lf.config, lf.data and lf.model, with HF's Trainer underneath."""

from lf.errors import ConfigError


def run(cfg, callbacks=()) -> dict:
    """Runs the recipe of `cfg.finetuning.stage`; returns what was written where."""
    from lf.train.preference import run_preference
    from lf.train.sft import run_sft

    recipes = {"pt": run_sft, "sft": run_sft, "rm": run_preference, "dpo": run_preference, "kto": run_preference}
    stage = cfg.finetuning.stage
    if stage not in recipes:
        raise ConfigError(f"stage {stage!r} cannot be trained yet: lf trains {', '.join(recipes)}")
    return recipes[stage](cfg, callbacks)
