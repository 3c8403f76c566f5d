"""The `petfm` command: one entry point, one sub-command per job.

Every sub-command lives in its own module as `main(argv: list[str]) -> int`; it is imported lazily so
that `petfm --help` is instant and a missing optional dependency only affects its own command.
A `petfm.errors.UserError` raised anywhere becomes one error line and exit status 2; so do a `MemoryError`
and an `OSError` (a file that cannot be read or written), as a safety net behind the checks in
`petfm.data.checks`.
"""

import importlib
import sys

from petfm.errors import UserError

COMMANDS = {
    "synthetic": ("data_prep.synthetic:main", "write a synthetic whole-body PET/CT cohort (autoPET layout)"),
    "prepare": ("data_prep.convert:main", "convert NIfTI studies (autoPET, nnU-Net, HECKTOR) to ArrayRecord"),
    "pretrain": ("petfm.train.pretrain:main", "pretrain FratMAE / MAE baselines"),
    "sweep": ("petfm.train.sweep:main",
              "run the masking-ratio sweep declared in a config and write its table"),
    "finetune": ("petfm.train.finetune:main", "fine-tune lesion segmentation or Ann Arbor staging"),
    "predict-lesions": ("petfm.downstream.predict:main",
                        "segment lesions in one study, mask in its original geometry"),
    "convert-sam-med3d": ("petfm.seganypet.official_weights:main",
                          "convert an official SAM-Med3D / SegAnyPET .pth to Orbax"),
    "train-seganypet": ("petfm.train.seganypet:main", "click-simulation training of the promptable model"),
    "eval-clicks": ("petfm.seganypet.eval_clicks:main", "Dice after 1/3/5/10 simulated clicks per target"),
    "segment": ("petfm.seganypet.interactive:main", "promptable segmentation of a NIfTI image from clicks"),
}


def _usage() -> str:
  lines = ["usage: petfm COMMAND [ARGS...]", "", "commands:"]
  lines += [f"  {name:<19} {help_}" for name, (_, help_) in COMMANDS.items()]
  lines += ["", "`petfm COMMAND --help` describes one command."]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help"):
    print(_usage())
    return 0
  name, rest = argv[0], argv[1:]
  if name not in COMMANDS:
    print(f"petfm: error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
    return 2
  module_name, func_name = COMMANDS[name][0].split(":")
  func = getattr(importlib.import_module(module_name), func_name)
  try:
    return int(func(rest) or 0)
  except UserError as e:
    print(f"petfm {name}: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  except MemoryError:
    print(f"petfm {name}: error: out of memory (an input is larger than this machine can hold)",
          file=sys.stderr)
    return 2
  except OSError as e:  # a named file or folder cannot be read or written: permissions, disk full, ...
    where = f"{e.filename}: " if e.filename else ""
    print(f"petfm {name}: error: {where}{e.strerror or ' '.join(str(e).split())}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"petfm {name}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
