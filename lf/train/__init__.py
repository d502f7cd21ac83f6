"""lf.train: one recipe per stage over lf.config, lf.data and lf.model, with HF's Trainer underneath."""

from lf.errors import ConfigError


def run(cfg, callbacks=()) -> dict:
    """Runs the recipe of `cfg.finetuning.stage`; returns what was written where. A run that fails before writing
    anything leaves no new output_dir; a full disk is a TrainError in one line."""
    from lf.train.checkpoints import no_empty_folder_left
    from lf.train.disk import full_disk_in_one_line
    from lf.train.preference import run_preference
    from lf.train.sft import run_sft

    recipes = {"pt": run_sft, "sft": run_sft, "rm": run_preference, "dpo": run_preference, "kto": run_preference}
    stage = cfg.finetuning.stage
    if stage not in recipes:
        raise ConfigError(f"stage {stage!r} cannot be trained yet: lf trains {', '.join(recipes)}")
    output_dir = cfg.training.output_dir
    with no_empty_folder_left(output_dir), full_disk_in_one_line(output_dir):
        return recipes[stage](cfg, callbacks)
