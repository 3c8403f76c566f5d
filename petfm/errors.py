"""User-facing errors: one clear line, no traceback."""

import argparse
from typing import NoReturn


class UserError(Exception):
  """Bad input from the user (file, field, value). The CLI prints `str(e)` as one line and exits 2.

  The message should name the file/field and say what is wrong, e.g.
  `study PETCT_01: SUV.nii.gz: array has 4 dimensions, expected 3`.
  """


class ArgumentParser(argparse.ArgumentParser):
  """`argparse` parser whose command-line errors are one `UserError` line instead of usage + exit 2."""

  def error(self, message: str) -> NoReturn:
    raise UserError(f"command line: {message}")
