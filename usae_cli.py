"""The command line of ``run_all.sh`` (``bash run_all.sh --preset synthetic --quick --seed 3``).

One dataclass, :class:`usae_pipeline.Experiment`, is the configuration, the command line and
``<out>/experiment.json``: the options come from its fields (``--n-concepts`` for ``n_concepts``),
their help from the "Attributes" section of its docstring. Every value is checked by constructing
the ``Experiment`` before any work: a refused option prints ``run_all.sh: <why>``, creates nothing
and exits with code 2. Then every ``notebooks/NN_*.py`` is converted with jupytext and executed
with papermill, in order, with one parameter: ``experiment``, the experiment's fields.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import re
import sys
import textwrap
import time
import types
import typing
from pathlib import Path
from typing import Any, Callable

import usae_io
from usae_pipeline import PROGRESS_VARIABLE, ROOT, Experiment

PROG = "run_all.sh"
PATHS = ("out", "figures", "images")  # folders, relative to where run_all.sh is called
# The notebooks' .py files carry no metadata (jupytext.toml): their kernel is this one.
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
DESCRIPTION = """\
Usage: bash run_all.sh [options]

Runs notebooks/00 ... 06 in order with papermill. Figures go to --figures as PNG files named after
the paper figures they reproduce; the executed notebooks, caches, checkpoints, experiment.json and
metrics.json go to --out. Stops with exit code 1 at the first failing notebook (or when another
run writes into --out), 2 on a bad option.
Options are the fields of usae_pipeline.Experiment (--opt VALUE or --opt=VALUE):
"""


class UsageError(Exception):
    """A bad option or value: reported as ``run_all.sh: <message>``, exit code 2."""


class FieldDoc(typing.NamedTuple):
    help: str
    choices: list[str] | None  # from a type like {"scalar", "channel"}
    default: str | None  # computed defaults: from a type line ending ", default: <text>"


def field_docs(cls: type) -> dict[str, FieldDoc]:
    """Field name -> :class:`FieldDoc`, from the numpy-style "Attributes" section of ``cls``'s
    docstring. An entry may name several fields (``a, b : int``); its type line may list the
    choices and name a computed default (``out : str, default: results/<preset>``)."""
    lines = inspect.cleandoc(cls.__doc__).splitlines()
    docs: dict[str, FieldDoc] = {}
    names: list[str] = []
    for line in lines[lines.index("Attributes") + 2:]:
        if line and not line.startswith(" "):  # "names : type[, default: text]"
            names_part, _, type_part = line.partition(" : ")
            names = [name.strip() for name in names_part.split(",")]
            choices = re.match(r"{(.*)}", type_part)
            default = re.search(r", default: (.*)$", type_part)
            docs.update({name: FieldDoc("", choices and re.findall(r'"(\w+)"', choices[1]),
                                        default and default[1]) for name in names})
        elif line.strip():
            text = line.strip().replace("``", "")
            docs.update({name: docs[name]._replace(help=f"{docs[name].help} {text}".strip())
                         for name in names})
    return docs


# Converters: (option, text) -> value; they raise UsageError naming the option.
def _integer(flag: str, text: str) -> int:
    if not re.fullmatch(r"-?[0-9]+", text):  # not int(): it also takes "1_0", " 3" and "٣"
        raise UsageError(f"{flag} must be an integer, got {text!r}.")
    return int(text)


def _number(flag: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"{flag} must be a number, got {text!r}.") from None


def _boolean(flag: str, text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise UsageError(f"{flag} must be true or false, got {text!r}.")
    return text.lower() == "true"


def _folder(flag: str, text: str) -> str:
    return os.path.abspath(os.path.expanduser(text))  # the notebooks run in notebooks/


# A field's type (None stripped from an optional one) -> (metavar, converter).
CONVERTERS = {int: ("N", _integer), float: ("X", _number), str: (None, lambda flag, text: text),
              bool: ("{true,false}", _boolean), list[str]: (
                  "NAME,NAME,...", lambda flag, text: [n.strip() for n in text.split(",")])}


class Option(typing.NamedTuple):
    name: str  # the Experiment field
    metavar: str | None  # None: a flag, which takes no value (--quick)
    convert: Callable[[str, str], Any]
    help: str


def options() -> dict[str, Option]:
    """``--flag`` -> :class:`Option`, one per field of :class:`Experiment`, in field order."""
    hints, docs, table = typing.get_type_hints(Experiment), field_docs(Experiment), {}
    for field in dataclasses.fields(Experiment):
        hint, doc = hints[field.name], docs.get(field.name)
        kind = next(t for t in typing.get_args(hint) if t is not type(None)) \
            if isinstance(hint, types.UnionType) else hint
        if kind not in CONVERTERS or doc is None:
            raise TypeError(f"Experiment.{field.name} ({hint}) has no command-line option: "
                            "describe it in Experiment's docstring, and give its type a "
                            "converter in usae_cli.CONVERTERS.")
        metavar, convert = ("DIR", _folder) if field.name in PATHS else CONVERTERS[kind]
        if hint is bool:  # a flag: --quick sets True
            metavar, default = None, "off"
        else:
            metavar = "{" + ",".join(doc.choices) + "}" if doc.choices else \
                metavar or field.name.upper()
            value = field.default_factory() if field.default is dataclasses.MISSING else \
                field.default  # the docstring says what a computed default is
            default = doc.default or ("none" if value in (None, "") else ",".join(value)
                                      if isinstance(value, list) else value)
        table["--" + field.name.replace("_", "-")] = Option(field.name, metavar, convert,
                                                            f"{doc.help} (default: {default})")
    return table


def format_help() -> str:
    rows = []
    for flag, option in options().items():
        head = f"  {flag} {option.metavar}" if option.metavar else f"  {flag}"
        lines = textwrap.wrap(option.help, 100 - 26, break_on_hyphens=False)
        # A long option and metavar get a line of their own, the help below.
        rows.append(head if len(head) > 24 else head.ljust(26) + lines.pop(0))
        rows += [" " * 26 + line for line in lines]
    return DESCRIPTION + "\n".join(rows) + "\n  -h, --help".ljust(27) + "This help."


def parse_args(argv: list[str]) -> dict[str, Any]:
    """The fields that ``argv`` sets; prints the help and exits 0 on ``-h`` or ``--help``."""
    table, values, args = options(), {}, list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            print(format_help())
            sys.exit(0)
        flag, has_value, text = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if flag not in table:
            raise UsageError(f"unknown option {flag!r}.")
        option = table[flag]
        if option.metavar is None:
            if has_value:
                raise UsageError(f"{flag} takes no value, got {arg!r}.")
            values[option.name] = True
            continue
        if not has_value:  # the value is the next word, unless it is missing or an option
            text = args.pop(0) if args and not args[0].startswith("--") else ""
        if not text:
            raise UsageError(f"{flag} needs a value.")
        values[option.name] = option.convert(flag, text)
    return values


def experiment_from(argv: list[str]) -> Experiment:
    """The validated :class:`Experiment` of ``argv``; raises :class:`UsageError`."""
    values = parse_args(argv)
    try:
        return Experiment(**values)
    except (ValueError, FileNotFoundError) as error:
        # Experiment names fields ("seed must be ..."); here they are options ("--seed must").
        message, name = str(error), str(error).split(" ", 1)[0]
        if message.startswith(f"{name} must ") and name in Experiment.__dataclass_fields__:
            message = "--" + name.replace("_", "-") + message[len(name):]
        raise UsageError(message) from None


def run_notebooks(exp: Experiment) -> int:
    """Execute every notebook in order; 0 when all ran, 1 at the first failure or when another
    process runs into the same output folder (it holds ``<out>/.lock``)."""
    try:
        with usae_io.exclusive(exp.folder / ".lock", f"running {PROG} into it"):
            return _run_notebooks(exp)
    except usae_io.BusyError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def kept_notebook(notebook, *, paired: bool):
    """An executed notebook as it is kept, changed in place and returned.

    Without papermill's injected-parameters cell: opened by hand, it finds its run from
    ``<out>/experiment.json`` (``usae_pipeline.resolve_experiment``), and papermill's metadata
    still records the parameters. Without empty tag lists, which the .py would show. Without
    widget state or widget views: once its kernel is gone a widget cannot be drawn again (a
    saved view reads "model not found" in JupyterLab), so every viewer, JupyterLab included,
    draws the image saved beside it (``usae_figures.show_widget``), not frozen controls or
    progress bars. Paired with its ``.py``
    (``ipynb,py:percent``) only when ``paired`` (the copy in ``notebooks/``): saving the copy in
    ``<out>/notebooks`` in JupyterLab writes that file alone, whatever ``jupytext.toml`` says.
    """
    notebook.cells = [cell for cell in notebook.cells
                      if "injected-parameters" not in cell.metadata.get("tags", [])]
    for cell in notebook.cells:  # papermill's empty lists would read `tags=[]` in the .py
        if cell.metadata.get("tags") == []:
            del cell.metadata["tags"]
    notebook.metadata.pop("widgets", None)
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            output.get("data", {}).pop(WIDGET_VIEW, None)
    notebook.metadata.setdefault("jupytext", {})["formats"] = \
        "ipynb,py:percent" if paired else "ipynb"
    return notebook


def _run_notebooks(exp: Experiment) -> int:
    import jupytext
    import nbformat
    import papermill

    folder = exp.folder / "notebooks"
    for path in (folder, Path(exp.figures)):
        path.mkdir(parents=True, exist_ok=True)
    exp.save()
    # The default run also refreshes notebooks/*.ipynb: they open in JupyterLab with its figures.
    publish = Path(exp.figures).resolve() == ROOT / "figures"
    # The kernels import the usae_* modules from the repository root, and draw no progress
    # bars: nobody watches them, and the bars would stay in the notebooks as frozen widgets.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT),
                                                             os.environ.get("PYTHONPATH")]))
    os.environ[PROGRESS_VARIABLE] = "0"
    print(f"preset={exp.preset} quick={exp.quick} out={exp.out} figures={exp.figures} "
          f"device={exp.device} seed={exp.seed}", flush=True)
    total_start = time.monotonic()
    for source in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py")):
        name, start = source.stem, time.monotonic()
        print(f"== {name}", flush=True)
        # The .py file is the source of truth; its notebook is regenerated, then executed.
        unexecuted, executed = folder / f"{name}.source.ipynb", folder / f"{name}.ipynb"
        try:
            notebook = jupytext.read(source)
            notebook.metadata.setdefault("kernelspec", KERNELSPEC)
            jupytext.write(notebook, unexecuted)
            papermill.execute_notebook(unexecuted, executed, cwd=source.parent,
                                       parameters={"experiment": dataclasses.asdict(exp)},
                                       progress_bar=False)
        except Exception as error:  # a failing cell, a dead kernel: either way, stop here
            what = f"{error.ename}: {error.evalue}" if hasattr(error, "ename") else \
                f"{type(error).__name__}: {error}"
            print(f"{PROG}: {name} failed ({what.splitlines()[0]}); see {executed}",
                  file=sys.stderr)
            return 1
        unexecuted.unlink()
        nbformat.write(kept_notebook(nbformat.read(executed, as_version=4), paired=False),
                       executed)
        if publish:
            nbformat.write(kept_notebook(nbformat.read(executed, as_version=4), paired=True),
                           source.with_suffix(".ipynb"))
        print(f"   {name} done in {time.monotonic() - start:.0f} s", flush=True)
    print(f"All notebooks done in {time.monotonic() - total_start:.0f} s.")
    print(f"Figures: {exp.figures}")
    print(f"Metrics: {exp.folder / 'metrics.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        exp = experiment_from(sys.argv[1:] if argv is None else argv)
    except UsageError as error:
        print(f"{PROG}: {error}\nTry 'bash {PROG} --help'.", file=sys.stderr)
        return 2
    return run_notebooks(exp)


if __name__ == "__main__":
    sys.exit(main())
