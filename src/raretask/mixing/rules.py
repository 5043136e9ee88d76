"""Tag untagged text with a task: a small YAML of regex / keyword rules, first match wins.

Example file::

    field: text            # which field holds the text (default: text)
    default: other         # task of text no rule matches (omit: such rows are malformed)
    rules:
      - task: arithmetic
        regex: '\\d+\\s*[-+*/]\\s*\\d+\\s*='
      - task: code
        keywords: ["def ", "import "]     # any of them, as plain substrings
        case_sensitive: false

Unknown keys are errors (``rules.1.regx: unknown key``), as is a regex that does not compile.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, model_validator

from raretask.config import StrictModel, load_yaml, validate
from raretask.errors import UserError


class Rule(StrictModel):
    """One rule: a task name and a regex or a list of keywords (either matches)."""

    task: str = Field(min_length=1, description="Task given to text this rule matches.")
    regex: str | None = Field(None, min_length=1, description="Python regex, searched anywhere.")
    keywords: list[str] | None = Field(None, min_length=1,
                                       description="Plain substrings; any one matches.")
    case_sensitive: bool = Field(True, description="Match case exactly.")

    @model_validator(mode="after")
    def _something_to_match(self) -> Rule:
        if self.regex is None and self.keywords is None:
            raise ValueError("give 'regex' or 'keywords'")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as err:
                raise ValueError(f"regex does not compile: {err}") from None
        if self.keywords is not None and any(k == "" for k in self.keywords):
            raise ValueError("keywords: empty keyword")
        return self


class RuleSet(StrictModel):
    """Rules applied in order to one text field; the first that matches names the task."""

    field: str = Field("text", min_length=1, description="Field holding the text.")
    default: str | None = Field(None, min_length=1,
                                description="Task of text no rule matches (omit: malformed).")
    rules: list[Rule] = Field(min_length=1)

    def compile(self) -> Tagger:
        return Tagger(self)


class Tagger:
    """Callable ``tagger(text) -> task or None`` built from a :class:`RuleSet`."""

    def __init__(self, rules: RuleSet):
        self.rules = rules
        self._tests = []
        for r in rules.rules:
            flags = 0 if r.case_sensitive else re.IGNORECASE
            parts = []
            if r.regex is not None:
                parts.append(r.regex)
            if r.keywords is not None:
                parts.extend(re.escape(k) for k in r.keywords)
            self._tests.append((re.compile("|".join(f"(?:{p})" for p in parts), flags), r.task))

    def __call__(self, text: str) -> str | None:
        for pattern, task in self._tests:
            if pattern.search(text):
                return task
        return self.rules.default


def load_rules(path: str | Path) -> RuleSet:
    """Read and validate a rules YAML; errors name the file and the field."""
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping with a 'rules:' list")
    return validate(RuleSet, data, str(path))
