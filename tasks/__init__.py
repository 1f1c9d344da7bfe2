"""The stages as plain functions over Arrow tables, each module with its config section and summary;
`grading/` (shared by every stage that grades), `finetune/` (one module per method), `sets/` (the shipped
sets' builders). No storage and no Prefect here: docs/ARCHITECTURE.md, "Layers"."""
