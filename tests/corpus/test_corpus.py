"""Every spelling of the corpus (tests/corpus/spell_*.py) goes through the whole pipeline: the sites it must fuse
fuse and execute, look-alikes are declined, outputs and gradients equal eager's."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import pytest
from _corpus import Spelling, check


def _corpus() -> list[Spelling]:
    here = Path(__file__).parent
    out: list[Spelling] = []
    for info in sorted(pkgutil.iter_modules([str(here)]), key=lambda m: m.name):
        if info.name.startswith("spell_"):
            out.extend(importlib.import_module(info.name).SPELLINGS)
    return out


SPELLINGS = _corpus()


def test_corpus_names_are_unique() -> None:
    names = [str(s) for s in SPELLINGS]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("spelling", SPELLINGS, ids=str)
def test_spelling(spelling: Spelling) -> None:
    check(spelling)
