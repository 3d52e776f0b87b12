"""Writes docs/api.md (from the docstrings) and docs/cli.md (from the argument parsers).

    python docs/reference.py          # rewrite both files
    python docs/reference.py --check  # exit 1 when a file is out of date (the test suite runs this)
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# What users call, in the order the API reference presents it.
API = [
    ("optimum_evopress", "EvoPressConfig"),
    ("optimum_evopress", "EvoPressCompressor"),
    ("optimum_evopress", "EvoPressResult"),
    ("optimum_evopress", "load_compressed"),
    ("optimum_evopress", "push_checkpoint"),
    ("optimum_evopress", "HubPushError"),
    ("optimum_evopress", "evaluate_perplexity"),
    ("optimum_evopress", "perplexity"),
    ("optimum_evopress", "read_levels_file"),
    ("optimum_evopress", "write_levels_file"),
    ("optimum_evopress", "register_method"),
    ("optimum_evopress.models", "load_default_model"),
    ("optimum_evopress.evaluation", "run_lm_eval"),
]
COMPRESSOR_METHODS = ["compress", "apply", "save_pretrained", "push_to_hub", "record"]


def _signature(obj) -> str:
    try:
        text = str(inspect.signature(obj)).replace(" -> 'None'", "").replace(" -> None", "")
    except (TypeError, ValueError):
        return "(...)"
    return re.sub(r"(: |-> )'([^']*)'", r"\1\2", text)  # postponed annotations print as strings


def _doc(obj) -> str:
    return inspect.cleandoc(obj.__doc__ or "").strip()


def api_markdown() -> str:
    import importlib

    from optimum_evopress.configuration import EvoPressConfig

    lines = ["# API reference", "", "Generated from the docstrings by `python docs/reference.py`; do not edit by hand.",
             ""]
    for module_name, name in API:
        obj = getattr(importlib.import_module(module_name), name)
        kind = "class" if inspect.isclass(obj) else "function"
        lines += [f"## `{module_name}.{name}`", ""]
        if obj is EvoPressConfig:
            lines += ["```python", f"class {name}(...)", "```", "", _doc(obj), "", "| field | default | meaning |",
                      "| --- | --- | --- |"]
            for f in dataclasses.fields(obj):
                default = (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                default = "required" if default is dataclasses.MISSING else f"`{default!r}`"
                lines.append(f"| `{f.name}` | {default} | {f.metadata.get('help', '').replace('|', '/')} |")
            lines += ["", "Methods: `to_dict`, `from_dict`, `to_json_file`, `from_json_file`, `save_pretrained`, "
                      "`from_pretrained` (a directory, a config file or a checkpoint's `evopress_config.json`).", ""]
            continue
        signature = _signature(obj.__init__ if kind == "class" else obj)
        if kind == "class" and issubclass(obj, BaseException):
            signature = f"({obj.__bases__[0].__name__})"
        elif kind == "class":
            signature = signature.replace("(self, ", "(").replace("(self)", "()")
        lines += ["```python", f"{kind if kind == 'class' else 'def'} {name}{signature}", "```", "", _doc(obj), ""]
        if name == "EvoPressCompressor":
            for method in COMPRESSOR_METHODS:
                member = getattr(obj, method)
                lines += [f"### `EvoPressCompressor.{method}`", "", "```python",
                          f"def {method}{_signature(member).replace('(self, ', '(').replace('(self)', '()')}", "```",
                          "", _doc(member), ""]
    return "\n".join(lines).rstrip() + "\n"


def cli_markdown() -> str:
    from optimum_evopress.cli import build_parser

    os.environ["COLUMNS"] = "110"  # argparse wraps help to the terminal width: fix it
    parser = build_parser()
    lines = ["# Command line reference", "",
             "Generated from the argument parsers by `python docs/reference.py`; do not edit by hand. "
             "Every command is also `optimum-cli evopress <command>` when Optimum is installed (extra `[optimum]`).",
             "", "Exit codes: 0 success; 1 the Hub refused the push or could not be reached (nothing committed); "
             "2 bad input (nothing written).", "", "```text", parser.format_help().rstrip(), "```", ""]
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        lines += [f"## `evopress {name}`", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="report out-of-date files instead of writing them")
    args = parser.parse_args()
    stale = []
    for name, text in (("api.md", api_markdown()), ("cli.md", cli_markdown())):
        path = os.path.join(HERE, name)
        current = open(path, encoding="utf-8").read() if os.path.exists(path) else None
        if current == text:
            continue
        stale.append(name)
        if not args.check:
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text)
    if args.check and stale:
        print(f"out of date: {', '.join(stale)}; run python docs/reference.py", file=sys.stderr)
        return 1
    print(("rewrote " if stale else "up to date: ") + ", ".join(stale or ["api.md", "cli.md"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
