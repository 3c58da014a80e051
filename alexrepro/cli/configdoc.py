"""Each stage's parameters as people read them: key, default, and the comment that cites the paper's section.

The config classes live in modules that import no torch (alexrepro.*.config), so `--help` stays instant. The
comments beside each field are the documentation (defaults cite the paper's section), so help and `--show-config`
print them as written: they are read from the class's source, which the import does not keep.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import io
import re
import textwrap
import tokenize
from dataclasses import dataclass

# Stage → (the torch-free module that defines its config, config class).
STAGE_CONFIGS = {
    "sample": ("alexrepro.synth.config", "SampleConfig"),
    "prepare": ("alexrepro.data.config", "PrepareConfig"),
    "stats": ("alexrepro.data.config", "StatsConfig"),
    "train": ("alexrepro.train.config", "TrainConfig"),
    "evaluate": ("alexrepro.evaluate.config", "EvaluateConfig"),
}


def config_class(stage: str) -> type:
    """The config dataclass of `stage` (no torch is imported)."""
    module, class_name = STAGE_CONFIGS[stage]
    return getattr(importlib.import_module(module), class_name)


@dataclass(frozen=True)
class Key:
    name: str
    type: str  # the annotation as written, e.g. "int", "Literal['paper', 'he']"
    default: object  # the literal default
    comment: str  # the comment beside the field (or the section heading above it), "" if none

    @property
    def default_text(self) -> str:
        return show_value(self.default)


def show_value(value: object) -> str:
    """A value as YAML spells it: null, true, [30, 60, 80]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show_value(v) for v in value) + "]"
    return str(value)


def stage_keys(stage: str) -> list[Key]:
    """The keys of `stage`'s config class in declaration order."""
    source = textwrap.dedent(inspect.getsource(config_class(stage)))
    comments = _line_comments(source)
    cls = ast.parse(source).body[0]
    assert isinstance(cls, ast.ClassDef)
    keys = []
    heading = ""
    previous_end = (cls.body[0].end_lineno or cls.lineno) if cls.body else cls.lineno
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None):
            continue
        # A comment line alone above the field, e.g. "# Learning (§5)", heads the fields below it.
        above = [comments[n] for n in range(previous_end + 1, node.lineno) if n in comments]
        if above and re.search(r"§|\(", above[0]) and len(above) == 1:
            heading = above[0]
        previous_end = node.end_lineno or node.lineno
        # The comment beside the field, wherever the formatter put it when it wrapped a long default.
        lines = range(node.lineno, (node.end_lineno or node.lineno) + 1)
        comment = " ".join(comments[n] for n in lines if n in comments)
        if "§" not in comment and "§" in heading:
            comment = f"{comment} [{heading}]".strip() if comment else heading
        keys.append(Key(node.target.id, ast.unparse(node.annotation), ast.literal_eval(node.value), comment))
    return keys


def _line_comments(source: str) -> dict[int, str]:
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    return comments
