"""Prompt and template files: one entry per line, UTF-8 text.

Read and checked when the config is made, so a binary file, an empty one or a template
without `{}` is a one-line error naming the flag, before any model is loaded.

A prompt file is a list of classes, so two more things are checked: no two prompts may be
the same class (`a circle` twice, or `a circle.` / `A circle!`: the teacher reads them as one
and the model would split its answer between the copies), and one prompt alone is said to be
what it is (a softmax over one class is 1 for every image). And when the classes also have
names of their own (the folders of a labelled test set), prompts are paired with them by
name, not by line order (`pair_prompts`)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Optional, Sequence

from ..core.errors import ConfigError

log = logging.getLogger(__name__)


def read_lines(path: str, flag: str) -> list[str]:
    """Non-blank lines of a UTF-8 text file (ConfigError naming `flag` otherwise)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{flag} {path}: not a file; give a text file with one entry per line")
    data = p.read_bytes()
    if b"\0" in data:
        raise ConfigError(f"{flag} {path}: a binary file, not text; give a UTF-8 text file with one entry per line")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{flag} {path}: not UTF-8 text (byte {e.start}); save it as UTF-8, one entry per "
                          f"line") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ConfigError(f"{flag} {path}: the file is empty; give one entry per line")
    return lines


def read_templates(path: Optional[str]) -> Optional[list[str]]:
    if path is None:
        return None
    lines = read_lines(path, "--templates")
    bad = [t for t in lines if "{}" not in t]
    if bad:
        raise ConfigError(f"--templates {path}: every line needs {{}} where the prompt goes; not: {bad[0]!r}")
    for t in lines:
        try:
            t.format("x")
        except (IndexError, KeyError, ValueError) as e:
            raise ConfigError(f"--templates {path}: {t!r} is not a template with one {{}} ({e})") from None
    return lines


def prompt_key(prompt: str) -> str:
    """What the teacher reads of a prompt as a class: case, spacing and punctuation do not make
    another class."""
    return " ".join(re.sub(r"[^\w\s]", " ", prompt.casefold()).split())


def folder_key(name: str) -> str:
    """A class folder's name (`red_car`, `Red-Car`) as the words it names, compared like prompts."""
    return prompt_key(name.replace("_", " "))


def check_prompts(lines: Sequence[str], flag: str, path: str, warn: bool = True) -> list[str]:
    """`lines` if every prompt is a class of its own (ConfigError naming the copies otherwise);
    a warning for a single prompt."""
    seen: dict[str, int] = {}
    for i, line in enumerate(lines, 1):
        k = prompt_key(line)
        if not k:
            raise ConfigError(f"{flag} {path}: line {i} ({line!r}) has no words; give one prompt per class")
        if k in seen:
            j = seen[k]
            same = "the same prompt" if lines[j - 1] == line else "the same prompt but for case or punctuation"
            raise ConfigError(f"{flag} {path}: lines {j} and {i} ({lines[j - 1]!r}, {line!r}) are {same}: the "
                              f"teacher reads them as one class and the model would split its answer between "
                              f"them; keep one line per class")
        seen[k] = i
    if len(lines) == 1 and warn:
        log.warning("%s %s holds one prompt (%r): a softmax over one class is 1.000 for every image, so the model "
                    "can only say 'this' and never 'none of these' by itself. Add a line for what else the images "
                    "show (e.g. 'a photo of something else') to get a model that can tell them apart.", flag, path,
                    lines[0])
    return list(lines)


def read_prompt_file(path: str, flag: str = "--prompts", warn: bool = True) -> list[str]:
    """The prompts of a file, one class a line, checked (`check_prompts`)."""
    return check_prompts(read_lines(path, flag), flag, path, warn)


def _names_in(name: str, prompt: str) -> bool:
    """Whether the class name (a folder: `red_car`, `Red-Car`) appears as whole words in the prompt,
    a plural ending allowed (`cats` names `cat`)."""
    words = folder_key(name)
    if not words:
        return False
    return re.search(rf"(?<!\w){re.escape(words)}(?:s|es)?(?!\w)", prompt_key(prompt)) is not None


def pair_prompts(classes: Sequence[str], prompts: Sequence[str], path: str, flag: str = "--prompts") -> list[str]:
    """The prompts in class order. Where the class names appear in the prompts (a folder `star`,
    a prompt `a photo of a star`), each class takes the prompt that names it, whatever the file's
    line order; where none does, the file's order is the classes' sorted order, and the log says so.
    A pairing that names some classes but cannot be resolved one to one is refused with its table."""
    classes, prompts = list(classes), list(prompts)
    if len(prompts) != len(classes):
        raise ConfigError(f"{flag} {path}: {len(prompts)} prompts for {len(classes)} classes "
                          f"({', '.join(classes)}); give one line per class")
    names = {c: [j for j, p in enumerate(prompts) if _names_in(c, p)] for c in classes}
    if not any(names.values()):
        if prompts != classes:
            log.info("%s %s: no class folder is named in a prompt, so they are paired by line order (folders in "
                     "sorted order): %s", flag, path, _table(classes, prompts))
        return prompts
    pairs = _resolve(classes, {c: set(js) for c, js in names.items()})
    if len(pairs) != len(classes):
        rows = "; ".join(f"{c} -> " + (prompts[pairs[c]] if c in pairs else
                                      ("named by " + " / ".join(repr(prompts[j]) for j in sorted(names[c]))
                                       if names[c] else "named by no prompt")) for c in classes)
        raise ConfigError(f"{flag} {path}: cannot pair the prompts with the class folders by name ({rows}). Name "
                          f"each folder in exactly one prompt (folder 'star' -> 'a photo of a star'), or name none "
                          f"and write the prompts in the folders' sorted order ({', '.join(classes)})")
    ordered = [prompts[pairs[c]] for c in classes]
    if ordered != prompts:
        log.info("%s %s: the prompts are paired with the class folders by name, not by line order: %s", flag, path,
                 _table(classes, ordered))
    return ordered


def _resolve(classes: list[str], cands: dict[str, set]) -> dict[str, int]:
    """Class -> prompt index, as far as the names decide it: a class named by one free prompt
    takes it, a prompt naming one free class alone goes to it, and a last class and a last prompt
    that names no class pair up. Anything else stays open (and is refused by the caller)."""
    pairs: dict[str, int] = {}
    while True:
        taken = set(pairs.values())
        free_c = [c for c in classes if c not in pairs]
        free_p = [j for j in range(len(classes)) if j not in taken]
        offers: dict[str, set] = {c: set() for c in free_c}
        for c in free_c:
            if len(cands[c] - taken) == 1:
                offers[c] |= cands[c] - taken
        for j in free_p:
            by = [c for c in free_c if j in cands[c]]
            if len(by) == 1:
                offers[by[0]].add(j)
        if len(free_c) == 1 and not offers[free_c[0]] and not any(free_p[0] in cands[c] for c in classes):
            offers[free_c[0]] = {free_p[0]}
        step = {c: next(iter(js)) for c, js in offers.items() if len(js) == 1}
        if not step or len(set(step.values())) != len(step):
            return pairs
        pairs.update(step)


def _table(classes: Sequence[str], prompts: Sequence[str]) -> str:
    return ", ".join(f"{c} -> {p!r}" for c, p in zip(classes, prompts))


def read_prompts(path: Optional[str], classes: list[str], default: list[str]) -> list[str]:
    """Prompts from a file (paired with the dataset's classes by name where they name them) or
    the dataset's defaults."""
    if path is None:
        if not default:
            raise ConfigError("this dataset has no class names to build prompts from; pass --prompts FILE "
                              "with one prompt per class")
        return list(default)
    lines = read_prompt_file(path, warn=False)
    if classes:
        lines = pair_prompts(classes, lines, path)
    log.info("classes and their prompts: %s", _table(classes or lines, lines))
    return lines
