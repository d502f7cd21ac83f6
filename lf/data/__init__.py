"""lf.data: dataset_info.json registry -> canonical rows -> templates -> processors -> packing -> collators.

    template, why = resolve_template(tokenizer, data_args.template)
    template.prepare_tokenizer(tokenizer)
    module = get_dataset(data_args, tokenizer=tokenizer, template=template, stage="sft")
    batches = DataLoader(module.train_dataset, collate_fn=collator(tokenizer), ...)
"""

from lf.data.collator import Collator
from lf.data.pipeline import DatasetModule, collator, get_dataset
from lf.data.templates import TEMPLATES, Template, fit_template, get_template, resolve_template

__all__ = ["Collator", "DatasetModule", "TEMPLATES", "Template", "collator", "get_dataset", "get_template",
           "resolve_template", "fit_template"]
