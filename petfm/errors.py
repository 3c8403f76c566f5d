"""User-facing errors: one clear line, no traceback."""


class UserError(Exception):
  """Bad input from the user (file, field, value). The CLI prints `str(e)` as one line and exits 2.

  The message should name the file/field and say what is wrong, e.g.
  `study PETCT_01: SUV.nii.gz: array has 4 dimensions, expected 3`.
  """
