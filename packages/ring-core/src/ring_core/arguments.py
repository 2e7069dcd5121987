"""What ``create_attention(name, **config)`` accepts, per implementation, read from the registered classes.

The factories forward ``**config`` to the class registered under ``name``, so its
constructor's signature is the list of arguments. :func:`describe_arguments` reads that
signature and finds a description for each argument: the class's (or a base class's)
docstring, as a Google-style ``Args:`` entry or a ``- ``name``: ...`` bullet, else the
meaning shared by every implementation (:data:`COMMON_ARGUMENTS`). ``ring-attention info
--name NAME`` prints the result; the API reference shows it for every installed implementation.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

from .registry import Implementation

__all__ = ["COMMON_ARGUMENTS", "ArgumentDoc", "describe_arguments", "format_arguments"]

# Arguments with one meaning in every implementation (SPEC.md, ARCHITECTURE.md).
COMMON_ARGUMENTS: dict[str, str] = {
    "segment_lengths": "segment length w_i of each branch, strictly increasing; a segment longer than N is one segment",
    "dilation_rates": "dilation rate r_i of each branch (positive, w_i % r_i == 0); [1] with one segment >= N is dense",
    "merge": '"lse" (LongNet\'s formula, the default) or "head_groups" (one branch per contiguous group of heads)',
    "layout": 'how the sequence is sharded over the ranks: "contiguous" or "zigzag" (causal load balance)',
    "process_group": "the torch.distributed group whose ranks hold the shards (None: the default group, if any)",
    "softmax_scale": "scale of q.k (None: 1/sqrt(head_dim))",
    "dropout": "dropout probability on the attention weights (training only)",
    "kernel": "force one kernel backend by name (None: the first available in priority order)",
    "transport": '"nccl" (batch_isend_irecv) or "copy_engine" (GPU copy engines, one host) for K/V and dK/dV',
    "window_size": "sliding window (left, right): query t sees only keys t-left..t+right (-1: unbounded; "
    "(-1, -1): none)",
    "timeout": "seconds any wait for a peer may take (None: forever); a stalled or dead peer raises "
    "CollectiveError naming this rank, the call, the exchange and the peers",
    "embed_dim": "model dimension (as torch.nn.MultiheadAttention)",
    "num_heads": "number of heads; embed_dim must be divisible by it (as torch.nn.MultiheadAttention)",
    "bias": "bias in the input and output projections (as torch.nn.MultiheadAttention)",
    "add_bias_kv": "learned bias rows appended to the keys and values (as torch.nn.MultiheadAttention)",
    "add_zero_attn": "a zero row appended to the keys and values (as torch.nn.MultiheadAttention)",
    "kdim": "key feature size (None: embed_dim; as torch.nn.MultiheadAttention)",
    "vdim": "value feature size (None: embed_dim; as torch.nn.MultiheadAttention)",
    "batch_first": "inputs are (B, N, E) if True, (N, B, E) if False (as torch.nn.MultiheadAttention)",
    "device": "device of the parameters (as torch.nn.MultiheadAttention)",
    "dtype": "dtype of the parameters (as torch.nn.MultiheadAttention)",
}


@dataclass(frozen=True)
class ArgumentDoc:
    """One constructor argument: name, kind (``positional``, ``keyword-only``, ``**``), annotation, default, text."""

    name: str
    kind: str
    annotation: str
    default: str
    description: str


def _docstring_descriptions(doc: str) -> dict[str, str]:
    """``{name: text}`` from an ``Args:`` section and from ``- ``name``, ``other``: text`` bullets."""
    found: dict[str, str] = {}
    args = re.search(r"^Args:\n(?P<body>(?:[ \t]+.*\n?|\n)+)", doc, re.M)
    if args:
        for match in re.finditer(r"^\s+\**(\w+)(?: \([^)]*\))?: (.+(?:\n\s{8,}.+)*)", args["body"], re.M):
            found[match[1]] = " ".join(match[2].split())
    bullet = r"^- (?P<names>``\**\w+``(?:(?:, | and )``\**\w+``)*): (?P<text>.+(?:\n  .+)*)"
    for match in re.finditer(bullet, doc, re.M):
        for name in re.findall(r"``\**(\w+)``", match["names"]):
            found.setdefault(name, " ".join(match["text"].split()))
    return found


def _plain(text: str) -> str:
    """Docstring markup as it reads in a terminal or in markdown: ````x```` -> `x`, :role:`~a.B` -> `B`."""
    text = re.sub(r":\w+:`~?(?:[\w.]+\.)?([\w]+)`", r"`\1`", text)
    return text.replace("``", "`")


def describe_arguments(impl: Implementation) -> list[ArgumentDoc]:
    """The constructor arguments of ``impl``'s class (the ``**config`` of the factories), each described.

    A description comes from the class's (or a base class's) docstring, as an ``Args:`` entry or a
    ``- ``name``: text`` bullet, else from :data:`COMMON_ARGUMENTS`; empty if neither has it.
    """
    cls = impl.cls
    own: dict[str, str] = {}
    for klass in cls.__mro__:  # a subclass's text first; a base class documents what it adds
        for doc in (inspect.getdoc(klass) if klass.__doc__ else "", klass.__dict__.get("__init__").__doc__ or ""
                    if "__init__" in klass.__dict__ else ""):  # fmt: skip
            for name, text in _docstring_descriptions(inspect.cleandoc(doc or "")).items():
                own.setdefault(name, text)
    kinds: dict[inspect._ParameterKind, str] = {
        inspect.Parameter.KEYWORD_ONLY: "keyword-only",
        inspect.Parameter.VAR_KEYWORD: "**",
        inspect.Parameter.VAR_POSITIONAL: "*",
    }
    described = []
    for parameter in list(inspect.signature(cls.__init__).parameters.values())[1:]:  # type: ignore[misc]
        annotation = parameter.annotation
        if annotation is inspect.Parameter.empty:
            annotation = ""
        elif not isinstance(annotation, str):
            annotation = inspect.formatannotation(annotation)
        default = "required" if parameter.default is inspect.Parameter.empty else repr(parameter.default)
        if parameter.kind in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL):
            default = ""
        text = _plain(own.get(parameter.name) or COMMON_ARGUMENTS.get(parameter.name, ""))
        described.append(ArgumentDoc(parameter.name, kinds.get(parameter.kind, ""), annotation, default, text))
    return described


def format_arguments(impl: Implementation, width: int = 100) -> str:
    """``describe_arguments`` as plain text: one argument per entry, the description indented under it."""
    import textwrap

    factory = "create_multihead_attention" if impl.kind == "multihead" else "create_attention"
    lines = [f"{factory}({impl.name!r}, **config) passes config to {impl.cls.__qualname__}, which accepts:"]
    for arg in describe_arguments(impl):
        prefix = "**" if arg.kind == "**" else ""
        head = f"  {prefix}{arg.name}" + (f": {arg.annotation}" if arg.annotation else "")
        head += f" = {arg.default}" if arg.default and arg.default != "required" else ""
        head += "  (required)" if arg.default == "required" else ""
        head += "  (keyword-only)" if arg.kind == "keyword-only" else ""
        lines.append(head)
        text = arg.description or "(not documented)"
        lines += textwrap.wrap(text, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)
