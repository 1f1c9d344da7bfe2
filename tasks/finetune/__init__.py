"""finetune: TRL trainers on the round's data -> a new checkpoint folder and its training metrics.

Organised the way TRL is: one module per method, each its training arguments, its dataset and its
trainer (`sft`, `dpo`, `grpo`, `raro`, `traces`, and `ppm` for the process preference model), and
one train-and-publish path they all share (`training`: staging folder, resume, atomic swap). The
round's config section is `config.FinetuneConfig`.
"""
