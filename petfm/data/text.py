"""Metadata prompts: the short text a study's metadata becomes for ContextAlign's frozen text encoder.

A template is a Python format string over `{tracer}`, `{age}`, `{sex}` and `{diagnosis}`, e.g.
`"{tracer} PET/CT, {age} {sex}, {diagnosis}"` → `"FDG PET/CT, 54-year-old female, lymphoma"`. Unknown
values render as nothing and the spaces and commas around them are tidied (`"FDG PET/CT, female"`); connecting
words written in the template stay, so prefer comma-separated templates. The Ann Arbor stage is deliberately
not available: it is a prediction target.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from petfm.errors import UserError

DEFAULT_TEMPLATE = "{tracer} PET/CT"
TEMPLATE_FIELDS = ("tracer", "age", "sex", "diagnosis")
_SEX_WORDS = {"M": "male", "F": "female"}


def make_prompt(meta: Mapping[str, Any], template: str = DEFAULT_TEMPLATE) -> str:
  """Renders `template` with a study's metadata.

  `meta` holds any of `tracer` ("FDG"/"PSMA"/"unknown"), `age` (years, NaN/None when unknown), `sex`
  ("M"/"F"/"unknown") and `diagnosis` (free text). Raises `UserError` for a template that uses other fields.
  """
  age = meta.get("age")
  values = {
      "tracer": meta.get("tracer") if meta.get("tracer") in ("FDG", "PSMA") else "",
      "age": f"{age:.0f}-year-old" if isinstance(age, (int, float)) and math.isfinite(age) else "",
      "sex": _SEX_WORDS.get(str(meta.get("sex")), ""),
      "diagnosis": str(meta.get("diagnosis") or "").strip(),
  }
  try:
    text = template.format(**values)
  except (KeyError, IndexError, ValueError) as e:
    raise UserError(f"config.prompt_template={template!r}: cannot render ({type(e).__name__}: {e}); "
                    f"it may use {', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)}") from None
  text = re.sub(r"\s+", " ", text)
  text = re.sub(r"\s+([,.;:])", r"\1", text)
  text = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", text)
  return text.strip(" ,;:") or "PET/CT"
