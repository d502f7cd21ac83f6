"""PiSSA: LoRA adapters initialised from the principal singular vectors of each target weight (the base keeps the
residual, so the model starts out computing what the base did). PEFT does the SVD; lf picks the variant and, with
pissa_convert, saves the trained adapter in a form that applies to the ORIGINAL base instead of the residual one."""

import os

INITIAL = "pissa_init"  # output_dir subfolder: the adapter as initialised (the reference for conversion)
BACKUP = "pissa_backup"  # output_dir subfolder: the trained adapter over the residual base, unconverted


def init_lora_weights(finetuning_args):
    """PEFT's init_lora_weights: exact SVD for pissa_iter -1, else fast randomized SVD with that many iterations."""
    if not finetuning_args.pissa_init:
        return True
    return "pissa" if finetuning_args.pissa_iter == -1 else f"pissa_niter_{finetuning_args.pissa_iter}"


def save_initial(model, output_dir: str) -> str:
    """Writes the adapter as it starts to output_dir/pissa_init. Marked as a plain LoRA init there: loading it must
    not run the SVD again (on a residual base that would split it a second time)."""
    folder = os.path.join(output_dir, INITIAL)
    config = model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True
    try:
        model.save_pretrained(folder)
    finally:
        config.init_lora_weights = init
    return folder


def save_converted(model, output_dir: str) -> None:
    """The trained adapter to output_dir/pissa_backup as it is, and to output_dir converted (PEFT folds the
    residual's difference from the base into an adapter of twice the rank) so that it loads on the original base."""
    model.save_pretrained(os.path.join(output_dir, BACKUP))
    model.save_pretrained(output_dir, path_initial_model_for_weight_conversion=os.path.join(output_dir, INITIAL))
