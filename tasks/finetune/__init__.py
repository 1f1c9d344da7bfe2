"""finetune: TRL trainers on the round's data -> a new checkpoint folder and its training metrics.

Organised the way TRL is: one module per method, each whole (`sft`, `dpo`, `grpo`, `raro`, `svs`,
`traces`, and `ppm` for the process preference model): its config section, its row selection
(`training_rows`, which the finetune flow calls), its dataset, its reward, its TRL arguments and its
trainer. They share one train-and-publish path (`training`: staging folder, resume, atomic swap) and
its supervisor (`launch`). The round's config section is `config.FinetuneConfig`, which holds each
method's section. docs/ARCHITECTURE.md, "Adding a stage, adding a finetune method".
"""
