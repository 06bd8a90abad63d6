"""Prompt templates: named sets (``openai``, ``simple``, ``cifar``) or a text file, ``{}`` marks the class name.

Example:
    >>> fill("a photo of a {}.", "goldfish")
    'a photo of a goldfish.'
    >>> parse_templates("# my prompts\\n\\na photo of a {}.\\na {} in the wild\\n")
    ['a photo of a {}.', 'a {} in the wild']
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from ._data import CIFAR_TEMPLATES

#: Names accepted by ``--templates`` besides a file path.
TEMPLATE_SETS = ("openai", "simple", "cifar")

#: The prompt the generative (likelihood) scorer prefers when the template set has it.
LIKELIHOOD_PROMPT = "a photo of a {}."


def named_templates(name: str) -> list[str]:
    """A built-in template set: ``openai`` (80 ImageNet prompts), ``simple`` (7), ``cifar`` (18).

    Raises:
        UsageError: unknown name.
    """
    if name == "cifar":
        return list(CIFAR_TEMPLATES)
    if name in ("openai", "simple"):
        from open_clip import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

        # open_clip stores them as callables (lambda c: f"a photo of a {c}."); cocatk keeps plain "{}" strings.
        chosen = OPENAI_IMAGENET_TEMPLATES if name == "openai" else SIMPLE_IMAGENET_TEMPLATES
        return [t("{}") if callable(t) else str(t) for t in chosen]
    raise UsageError(f"unknown template set '{name}'", hint=f"use one of: {', '.join(TEMPLATE_SETS)}, or a file path")


def parse_templates(text: str, source: str = "templates") -> list[str]:
    """Templates from text: one per line, ``{}`` marks the class name; blank lines and ``#`` comments are ignored.

    Raises:
        UsageError: a line has no ``{}``, or there is no template at all.
    """
    templates: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "{}" not in line:
            raise UsageError(
                f"{source} line {number} has no '{{}}' placeholder: {line!r}",
                hint="write one template per line with {} where the class name goes, e.g. 'a photo of a {}.'",
            )
        templates.append(line)
    if not templates:
        raise UsageError(f"{source} holds no template", hint="write one template per line, e.g. 'a photo of a {}.'")
    return templates


def load_templates(value: str | None, default: str = "openai") -> tuple[str, list[str]]:
    """Resolve ``--templates``: a set name or a file path; None means ``default``.

    Returns:
        (label, templates): the label names the set (``openai``) or the file (``file:prompts.txt``).

    Raises:
        UsageError: unknown name, unreadable or malformed file.
    """
    value = value or default
    if value in TEMPLATE_SETS:
        return value, named_templates(value)
    path = Path(value).expanduser()
    if not path.is_file():
        raise UsageError(
            f"templates '{value}' is neither a template set nor a file",
            hint=f"use one of: {', '.join(TEMPLATE_SETS)}, or the path of a text file with one template per line",
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read templates file {path}: {e}", hint="pass a UTF-8 text file") from e
    return f"file:{path.name}", parse_templates(text, source=str(path))


def fill(template: str, classname: str) -> str:
    """Put a class name into a template (plain replacement, so other braces in the template are kept)."""
    return template.replace("{}", classname)


def likelihood_prompt(templates: list[str], builtin: bool = False) -> str:
    """The one template the likelihood scorer uses.

    ``a photo of a {}.`` for the built-in sets (their first entries, e.g. OpenAI's "a bad photo of a {}.", bias the
    caption likelihood) and for user templates that contain it; otherwise the user's first template.
    """
    return LIKELIHOOD_PROMPT if builtin or LIKELIHOOD_PROMPT in templates else templates[0]
