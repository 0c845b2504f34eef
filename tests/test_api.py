"""Tests of the public surface: every name in `jlora.__all__` is documented with a runnable
example, and the documented arguments are the real ones."""

import dataclasses
import importlib.metadata
import inspect
import re

import pytest

import jlora


def _section(doc: str, title: str) -> list[str] | None:
  """The entry names of a Google-style section (``Args:``, ``Attributes:``), or None."""
  lines = doc.splitlines()
  for i, line in enumerate(lines):
    if line.strip() == f"{title}:":
      indent = len(line) - len(line.lstrip())
      names, body_indent = [], None
      for entry in lines[i + 1:]:
        if not entry.strip():
          continue
        depth = len(entry) - len(entry.lstrip())
        if depth <= indent:
          break
        body_indent = depth if body_indent is None else body_indent
        match = re.match(r"\s*(\*{0,2}\w+)\s*(\(.*\))?:", entry)
        if depth == body_indent and match:
          names.append(match.group(1))
      return names
  return None


def _signature_names(fn) -> list[str]:
  names = []
  for p in inspect.signature(fn).parameters.values():
    star = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
    names.append(star + p.name)
  return names


PUBLIC = sorted(jlora.__all__)
FUNCTIONS = [n for n in PUBLIC if inspect.isfunction(getattr(jlora, n))]
CLASSES = [n for n in PUBLIC if inspect.isclass(getattr(jlora, n))]


def test_all_lists_real_objects_once():
  assert len(set(jlora.__all__)) == len(jlora.__all__)
  assert sorted(FUNCTIONS + CLASSES) == PUBLIC


def test_version():
  assert isinstance(jlora.__version__, str)
  assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)?", jlora.__version__)
  assert jlora.__version__ == importlib.metadata.version("jlora")


def test_package_docstring_has_an_example():
  assert ">>>" in (jlora.__doc__ or "")


@pytest.mark.parametrize("name", PUBLIC)
def test_public_object_has_a_docstring_with_an_example(name):
  doc = inspect.getdoc(getattr(jlora, name)) or ""
  summary = doc.splitlines()[0] if doc else ""
  assert summary.strip(), f"jlora.{name} has no docstring"
  assert ">>>" in doc, f"jlora.{name}'s docstring has no runnable `>>>` example"


@pytest.mark.parametrize("name", FUNCTIONS)
def test_function_args_section_matches_its_signature(name):
  fn = getattr(jlora, name)
  params = _signature_names(fn)
  documented = _section(inspect.getdoc(fn) or "", "Args")
  if not params:
    assert documented in (None, []), f"jlora.{name} documents arguments it does not take"
    return
  assert documented is not None, f"jlora.{name} takes {params} but has no `Args:` section"
  assert documented == params, (
      f"jlora.{name}: `Args:` lists {documented}, the signature has {params}")


@pytest.mark.parametrize("name", [n for n in CLASSES
                                  if dataclasses.is_dataclass(getattr(jlora, n))])
def test_dataclass_attributes_section_matches_its_fields(name):
  cls = getattr(jlora, name)
  fields = [f.name for f in dataclasses.fields(cls)]
  documented = _section(inspect.getdoc(cls) or "", "Attributes")
  assert documented == fields, f"jlora.{name}: `Attributes:` lists {documented}, fields {fields}"


def test_section_parser():
  doc = """Summary.

  Args:
    key: a key.
    params: a tree;
      continued: not an entry.
    *example_args: inputs.
    **example_kwargs: keyword inputs.

  Returns:
    something: not an arg.
  """
  assert _section(inspect.cleandoc(doc), "Args") == [
      "key", "params", "*example_args", "**example_kwargs"]
  assert _section("No sections.", "Args") is None
