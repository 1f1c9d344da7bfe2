"""The process preference model as a step scorer: a checkpoint with role `ppm` (tasks/finetune.py:
train_ppm) loaded with transformers, scoring texts in batches; tanh keeps scores in (-1, 1) like Q."""
from __future__ import annotations

from pathlib import Path


class PPMScorer:
    def __init__(self, path: str | Path, batch_size: int = 16):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.truncation_side = "left"  # the step under judgement is at the end: keep it
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        self.batch_size = batch_size

    def __call__(self, texts: list[str]) -> list[float]:
        scores: list[float] = []
        with self.torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(texts[start : start + self.batch_size], return_tensors="pt", padding=True,
                                       truncation=True, max_length=1024)
                logits = self.model(**batch).logits[:, 0]
                scores += self.torch.tanh(logits).tolist()
        return scores


def ppm_scorer(checkpoint: dict | None) -> PPMScorer | None:
    """The scorer of the PPM a `checkpoints` row (role 'ppm') names; None for none. A PPM on object storage is
    downloaded once and verified."""
    if checkpoint is None:
        return None
    from evoforge.models.checkpoint_store import local_copy

    return PPMScorer(str(local_copy(checkpoint["path"])))
