"""What the factories accept, per implementation: read from the registered classes, every argument described."""

from __future__ import annotations

import inspect

import pytest

import ring_core
from ring_core.arguments import describe_arguments, format_arguments
from ring_core.cli import main


@pytest.mark.parametrize("impl", ring_core.list_implementations(), ids=lambda i: i.name)
def test_every_argument_of_every_implementation_is_described(impl):
    described = describe_arguments(impl)
    parameters = list(inspect.signature(impl.cls.__init__).parameters)[1:]
    assert [a.name for a in described] == parameters
    undocumented = [a.name for a in described if not a.description]
    assert not undocumented, f"{impl.cls.__name__}: document {undocumented} in its docstring (Args: or - ``name``: ...)"
    text = format_arguments(impl)
    assert all(name in text for name in parameters) and "(not documented)" not in text


def test_descriptions_come_from_the_class_first_then_the_shared_meanings():
    impls = {i.name: i for i in ring_core.list_implementations()}
    ring = {a.name: a for a in describe_arguments(impls["ring_dilated"])}
    assert ring["transport"].kind == "keyword-only" and ring["transport"].default == "'nccl'"
    assert "copy_engine" in ring["transport"].description
    assert ring["segment_lengths"].default == "required"
    assert ring["segment_lengths"].description == ring_core.arguments.COMMON_ARGUMENTS["segment_lengths"]
    if "multihead_dilated" in impls:  # its own text wins over the shared meaning: None means dense
        multihead = {a.name: a for a in describe_arguments(impls["multihead_dilated"])}
        assert "dense" in multihead["segment_lengths"].description
        assert multihead["segment_lengths"].description != ring_core.arguments.COMMON_ARGUMENTS["segment_lengths"]


def test_info_name_prints_the_arguments(capsys):
    assert main(["info", "--name", "RingDilatedAttention"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ring_dilated: ") and "available here: yes" in out
    assert "create_attention('ring_dilated', **config)" in out and "transport: str = 'nccl'  (keyword-only)" in out


def test_info_name_of_an_unknown_name_says_the_closest(capsys):
    assert main(["info", "--name", "ring_dilatd"]) == 1
    assert "Did you mean 'ring_dilated'?" in capsys.readouterr().out


def test_factory_docstring_says_where_the_arguments_are():
    for factory in (ring_core.create_attention, ring_core.create_multihead_attention):
        doc = inspect.getdoc(factory)
        assert "**config" in doc and "ring-attention info --name NAME" in doc and "describe_arguments" in doc
