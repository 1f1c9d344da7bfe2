"""The base of every section of the round config (flows/config.py `RoundConfig`) and of the settings
nested in them: a key a section does not declare is an error, never silently ignored. A typo such as
`generate: {samplng: {n: 2}}` would otherwise load without a word and the round would sample the
default; `load_config` turns the error into one line naming the file, the key and the closest valid one."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")
